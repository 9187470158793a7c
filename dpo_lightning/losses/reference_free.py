"""Reference-free losses: no reference model is loaded or run (``requires_reference=False``).

Rewards are beta * policy log-probs (averaged for the length-normalized ones), as TRL 1.16's experimental
``CPOTrainer`` / ``ORPOTrainer`` log them. ``nll_loss`` is ``LossInputs.chosen_nll``: the token-mean NLL of
the chosen completions (prompt tokens excluded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpo_lightning.losses.common import need, policy_rewards
from dpo_lightning.losses.registry import LossInputs, LossOutput, register


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable everywhere, finite value and gradient even at x = 0.

    Maechler 2012 branch at -log 2 (as TRL); x is first clamped to <= -eps (eps = dtype epsilon) so a
    sequence the model predicts with certainty (mean log-prob rounding to 0) gives a large finite value
    instead of -inf / NaN; each branch only sees inputs inside its own domain, so no NaN leaks into the
    gradient through ``torch.where``.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    t = -0.6931471805599453
    small = x < t
    return torch.where(small, torch.log1p(-torch.exp(torch.where(small, x, t))),
                       torch.log(-torch.expm1(torch.where(small, t, x))))


@register("orpo", paper="Hong et al. 2024 (ORPO), arXiv:2403.07691, Eqs. 4, 6-7", requires_reference=False,
          length_normalized=True)
def orpo(x: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """NLL - lambda * log sigma(log odds(y_c) - log odds(y_r)), odds(y) = p / (1 - p), p = exp(mean log-prob).

    ``beta`` is the paper's lambda. Per-example losses include the batch NLL, so their mean is the loss.
    Departures from TRL's ORPOTrainer, on purpose: its NLL also covers the prompt tokens (we use the
    completion, as the paper's L_SFT and as CPO do), so ``loss`` and ``nll_loss`` differ while the odds-ratio
    terms, rewards and log_odds_* metrics match; mean log-probs in (-eps, 0] are clamped (see log1mexp).
    """
    need(x, "orpo", "chosen_nll")
    assert x.chosen_nll is not None and x.chosen_logps is not None and x.rejected_logps is not None  # paired
    c, r = x.chosen_logps.float(), x.rejected_logps.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))  # [B]
    ratio = F.logsigmoid(log_odds)
    losses = (x.chosen_nll.float() - beta * ratio).to(x.chosen_logps.dtype)
    metrics = {"nll_loss": x.chosen_nll.detach(), "log_odds_ratio": ratio.detach().mean(),
               "log_odds_chosen": log_odds.detach().mean()}
    return LossOutput(losses.mean(), losses, *policy_rewards(x, beta), metrics)


def _cpo_like(x: LossInputs, name: str, beta: float, gamma: float, label_smoothing: float, cpo_alpha: float,
              alpha: float = 0.0) -> LossOutput:
    """TRL CPOTrainer.cpo_loss (sigmoid/simpo) + cpo_alpha * NLL, optionally with AlphaPO rewards."""
    c, r = x.chosen_logps, x.rejected_logps
    assert c is not None and r is not None  # paired inputs
    if alpha != 0.0:  # AlphaPO reward (1 - p^-alpha) / alpha with p = exp(log-prob), written stably
        c, r = -torch.expm1(-alpha * c) / alpha, -torch.expm1(-alpha * r) / alpha
    logits = (c - r) - gamma / beta  # gamma = 0: CPO
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    metrics = {}
    if x.chosen_nll is not None:
        metrics["nll_loss"] = x.chosen_nll.detach()
    if cpo_alpha != 0.0:
        need(x, name, "chosen_nll")
        assert x.chosen_nll is not None  # need() checked it
        losses = losses + cpo_alpha * x.chosen_nll
    chosen_rewards, rejected_rewards = beta * c.detach(), beta * r.detach()  # c, r: log-probs or alpha-rewards
    return LossOutput(losses.mean(), losses, chosen_rewards, rejected_rewards, metrics)


@register("cpo", paper="Xu et al. 2024 (CPO), arXiv:2401.08417, Eq. 3 (L_prefer) + L_NLL",
          requires_reference=False)
def cpo(x: LossInputs, *, beta: float = 0.1, label_smoothing: float = 0.0, cpo_alpha: float = 1.0) -> LossOutput:
    """-log sigma(beta (log pi(c) - log pi(r))) (+cDPO smoothing) + cpo_alpha * NLL(chosen); summed log-probs.

    Per-example losses include cpo_alpha * batch NLL, so their mean is TRL's loss.
    """
    return _cpo_like(x, "cpo", beta, 0.0, label_smoothing, cpo_alpha)


@register("simpo", paper="Meng et al. 2024 (SimPO), arXiv:2405.14734, Eq. 6", requires_reference=False,
          length_normalized=True)
def simpo(x: LossInputs, *, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0,
          cpo_alpha: float = 0.0) -> LossOutput:
    """-log sigma(beta (mean log pi(c) - mean log pi(r)) - gamma) on averaged log-probs.

    ``gamma`` is TRL's ``simpo_gamma`` (the absolute margin). ``cpo_alpha`` adds CPO's NLL term (TRL's
    CPOTrainer default is 1.0; the SimPO paper has none, so ours is 0). Departure: ``nll_loss`` is logged
    as the actual NLL even when ``cpo_alpha=0`` (TRL logs 0 then).
    """
    return _cpo_like(x, "simpo", beta, gamma, label_smoothing, cpo_alpha)


@register("alphapo", paper="Gupta et al. 2025 (AlphaPO), arXiv:2501.03884, alpha-reward r = (1 - p^-alpha)/alpha "
          "in the SimPO objective", requires_reference=False, length_normalized=True)
def alphapo(x: LossInputs, *, beta: float = 2.0, gamma: float = 0.5, alpha: float = 0.25,
            label_smoothing: float = 0.0, cpo_alpha: float = 0.0) -> LossOutput:
    """SimPO with AlphaPO's reward shape r(p) = (1 - p^-alpha) / alpha, p = exp(mean log-prob); alpha -> 0 is SimPO.

    As TRL (``CPOConfig(loss_type='alphapo')`` = simpo with cpo_alpha=0 and ``alpha``); rewards are beta * r.
    """
    return _cpo_like(x, "alphapo", beta, gamma, label_smoothing, cpo_alpha, alpha)
