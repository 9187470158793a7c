"""DPO and the losses built on the chosen-minus-rejected implicit reward difference (f-DPO capable).

Each takes the f-DPO scores (``fdivergence.py``; the plain log-ratios for ``reverse_kl``) and follows
TRL 1.16 ``DPOTrainer._compute_loss`` for the same ``loss_type``. Rewards are beta * log(pi/pi_ref).
WPO weights multiply the per-pair losses when the module supplies them (``use_weighting=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpo_lightning.losses.common import completion_lengths, logratios, paired_output, reference_rewards, wpo
from dpo_lightning.losses.fdivergence import check, scores
from dpo_lightning.losses.registry import LossInputs, LossOutput, Range, register

__all__ = ["logratios", "reference_rewards"]  # re-exported for backwards compatibility
FDIV = "reverse_kl"


def _smoothing(lo: float, hi: float, strict_lo: bool = False):
    def bind(hp: dict) -> dict:
        eps = float(hp.get("label_smoothing", 0.0))
        if eps < lo or eps >= hi or (strict_lo and eps == lo):
            raise ValueError(f"label_smoothing={eps} must lie in {'(' if strict_lo else '['}{lo}, {hi})")
        return check(hp)
    return bind


@register("sigmoid", paper="Rafailov et al. 2023 (DPO), arXiv:2305.18290, Eq. 7; cDPO label smoothing "
          "(Mitchell 2023)", bind=_smoothing(0.0, 0.5))
def sigmoid(x: LossInputs, *, beta: float = 0.1, label_smoothing: float = 0.0, f_divergence_type: str = FDIV,
            f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """-(1-eps) log sigma(beta * delta) - eps log sigma(-beta * delta), delta = chosen - rejected score.

    Shapes: every tensor in ``x`` is [B]; returns per-example losses [B].
    Departure: TRL 1.16 dropped label smoothing (cDPO) from ``sigmoid``; at ``label_smoothing=0`` (default)
    the numbers are TRL's.
    """
    c, r = scores(x, f_divergence_type, f_alpha_divergence_coef)
    logits = beta * (c - r)  # [B]
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)  # Eq. 7 (+cDPO)
    return paired_output(wpo(losses, x), x, beta)


@register("sigmoid_norm", paper="Length-normalized DPO (Tulu 3 'DPO-norm', Lambert et al. 2024, "
          "arXiv:2411.15124, length-normalized DPO objective)", bind=check)
def sigmoid_norm(x: LossInputs, *, beta: float = 0.1, f_divergence_type: str = FDIV,
                 f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """-log sigma(beta * (s_c / |y_c| - s_r / |y_r|)): DPO on per-token-averaged scores.

    The division happens here (TRL: inside the loss); rewards stay the unnormalized beta * log-ratio.
    """
    c, r = scores(x, f_divergence_type, f_alpha_divergence_coef)
    lc, lr = completion_lengths(x, "sigmoid_norm")
    losses = -F.logsigmoid(beta * (c / lc - r / lr))
    return paired_output(wpo(losses, x), x, beta)


@register("hinge", paper="Zhao et al. 2023 (SLiC-HF), arXiv:2305.10425, Sec. 2 calibration loss (delta=1, "
          "log-ratios against the reference as in TRL)", bind=check)
def hinge(x: LossInputs, *, beta: float = 0.1, f_divergence_type: str = FDIV,
          f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """relu(1 - beta * delta): the SLiC rank-calibration hinge with margin 1/beta on the log-ratio gap."""
    c, r = scores(x, f_divergence_type, f_alpha_divergence_coef)
    losses = torch.relu(1 - beta * (c - r))
    return paired_output(wpo(losses, x), x, beta)


@register("ipo", paper="Azar et al. 2023 (IPO), arXiv:2310.12036, Eq. 17 (length-normalized as TRL, "
          "confirmed with the IPO authors)", bind=check)
def ipo(x: LossInputs, *, beta: float = 0.1, f_divergence_type: str = FDIV,
        f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """(s_c / |y_c| - s_r / |y_r| - 1 / (2 beta))^2, beta being the paper's tau.

    Scores are divided by the completion lengths here, as TRL does (so ``ipo`` is not ``length_normalized``
    metadata and its rewards stay beta * summed log-ratio).
    """
    c, r = scores(x, f_divergence_type, f_alpha_divergence_coef)
    lc, lr = completion_lengths(x, "ipo")
    losses = (c / lc - r / lr - 1 / (2 * beta)) ** 2
    return paired_output(wpo(losses, x), x, beta)


@register("robust", paper="Chowdhury et al. 2024 (rDPO), arXiv:2403.00409, Sec. 3 (the rDPO loss)", bind=_smoothing(0.0, 0.5))
def robust(x: LossInputs, *, beta: float = 0.1, label_smoothing: float = 0.1, f_divergence_type: str = FDIV,
           f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """[-(1-eps) log sigma(beta delta) + eps log sigma(-beta delta)] / (1 - 2 eps), eps = flip rate in [0, 0.5).

    Default eps=0.1 (the paper's typical value; TRL's default 0 makes it plain DPO).
    """
    c, r = scores(x, f_divergence_type, f_alpha_divergence_coef)
    z = beta * (c - r)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return paired_output(wpo(losses, x), x, beta)


@register("exo_pair", paper="Ji et al. 2024 (EXO), arXiv:2402.00856, Eq. 16 (K=2)",
          bind=_smoothing(0.0, 1.0, strict_lo=True), ranges={"label_smoothing": Range(0, 1, True, True)})
def exo_pair(x: LossInputs, *, beta: float = 0.1, label_smoothing: float = 1e-3, f_divergence_type: str = FDIV,
             f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """KL(p_theta || p_rh) over {chosen, rejected}: p_theta = softmax(beta * scores), p_rh = (1-eps, eps).

    = sigma(z)(log sigma(z) - log(1-eps)) + sigma(-z)(log sigma(-z) - log eps), z = beta * delta. eps > 0
    (TRL refuses 0); default 1e-3 as the paper recommends.
    """
    c, r = scores(x, f_divergence_type, f_alpha_divergence_coef)
    z = beta * (c - r)
    eps = torch.tensor(label_smoothing, dtype=z.dtype, device=z.device)
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(eps)))
    return paired_output(wpo(losses, x), x, beta)


@register("discopop", paper="Lu et al. 2024 (DiscoPOP), arXiv:2406.08414, Eq. 5", bind=check)
def discopop(x: LossInputs, *, beta: float = 0.1, discopop_tau: float = 0.05, f_divergence_type: str = FDIV,
             f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """Log-ratio modulated loss: (1 - m) * (-log sigma(z)) + m * exp(-z), m = sigma(z / tau), z = beta * delta."""
    c, r = scores(x, f_divergence_type, f_alpha_divergence_coef)
    z = beta * (c - r)
    m = torch.sigmoid(z / discopop_tau)
    losses = -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m
    return paired_output(wpo(losses, x), x, beta)
