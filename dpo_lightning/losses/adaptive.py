"""Losses for users who would rather not sweep beta, and one that needs no hyperparameter at all.

    beta_dpo   beta-DPO: DPO with a batch-level dynamic beta and beta-guided data filtering (Wu et al. 2024)
    dpop       DPO-Positive (Smaug): DPO plus a penalty when the chosen log-prob falls below the reference's
    simper     SimPER: reference-free, minimizes the perplexity of chosen and maximizes that of rejected

None of them is in TRL 1.16 (its DPOTrainer has no ``loss_type`` for them); the semantics follow the papers
and, for beta-DPO, the authors' reference code (github.com/junkangwu/beta-DPO, ``trainers.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpo_lightning.losses.common import completion_lengths, logratios, need, paired_output, wpo
from dpo_lightning.losses.registry import NON_NEGATIVE, LossInputs, LossOutput, Range, register

GAP_MEAN, GAP_STD = "beta_dpo/gap_mean", "beta_dpo/gap_std"


def _pooled_mean_std(gap: torch.Tensor) -> tuple[float, float]:
    """Mean and (unbiased) standard deviation of the batch's gaps, pooled over data-parallel ranks."""
    g = gap.detach().double()
    stats = torch.stack([g.sum(), (g * g).sum(), torch.tensor(float(g.numel()), dtype=torch.float64,
                                                                device=g.device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    total, sq, n = (float(v) for v in stats)
    mean = total / n
    var = (sq - n * mean * mean) / (n - 1) if n > 1 else 0.0
    return mean, max(var, 0.0) ** 0.5


@register("beta_dpo", paper="Wu et al. 2024 (beta-DPO), arXiv:2407.08639, Sec. 4 (dynamic beta, Eq. 7; "
          "beta-guided data filtering, Eq. 8)",
          ranges={"filter_ratio": Range(0, 1, hi_open=True), "momentum": Range(0, 1, hi_open=True)})
def beta_dpo(x: LossInputs, *, beta: float = 0.1, alpha: float = 0.6, filter_ratio: float = 0.2,
             momentum: float = 0.9) -> LossOutput:
    """-log sigma(beta_b * delta) over a filtered subset of the batch, delta = chosen - rejected log-ratio.

    Training step (gradients flow), as the authors' code:
      1. running statistics of the gap delta: M_0 <- m M_0 + (1-m) mean(delta), sigma <- m sigma + (1-m) std(delta)
         (``momentum`` m; kept in ``x.state``, checkpointed by the module);
      2. filtering (Eq. 8): keep round((1 - filter_ratio) * B) pairs drawn without replacement with probability
         proportional to exp(-(delta_i - M_0)^2 / (2 sigma^2)) (outlier pairs are dropped);
      3. dynamic beta (Eq. 7): beta_b = beta * (1 + alpha * (mean(delta over kept pairs) - M_0)), at least 1e-3,
         detached; the loss is the mean over kept pairs.
    Validation (no gradients): statistics are read unchanged, no pair is dropped.

    Departures from the reference code: the running statistics start at the first batch's values (the code
    starts them at 0, so sigma is tiny for the first ~20 steps); filtering is per rank, the statistics are
    pooled over ranks. Rewards are beta (the base value) times the log-ratios, as the reference code logs.
    Metrics: ``beta`` (beta_b), ``gap_mean`` (M_0), ``gap_std`` (sigma), ``kept_fraction``.
    """
    c, r = logratios(x)
    gap = c - r  # [B]
    g = gap.detach().float()
    training = torch.is_grad_enabled() and gap.requires_grad
    if training:
        mean, std = _pooled_mean_std(g)
        if GAP_MEAN in x.state:
            mean = momentum * float(x.state[GAP_MEAN]) + (1 - momentum) * mean
            std = momentum * float(x.state[GAP_STD]) + (1 - momentum) * std
        x.state[GAP_MEAN], x.state[GAP_STD] = mean, std
    m0, sigma = float(x.state.get(GAP_MEAN, g.mean())), float(x.state.get(GAP_STD, 0.0))
    keep = torch.ones_like(g)
    n_keep = max(1, round((1 - filter_ratio) * g.numel()))
    if training and n_keep < g.numel():
        z = (g - m0) / max(sigma, 1e-6)
        weights = torch.exp(-0.5 * z * z).clamp_min(1e-30)  # [B] Eq. 8
        keep = torch.zeros_like(g)
        keep[torch.multinomial(weights, n_keep, replacement=False)] = 1.0
    kept_gap = (g * keep).sum() / keep.sum()
    beta_b = (beta * (1 + alpha * (kept_gap - m0))).clamp(min=1e-3)  # Eq. 7
    losses = wpo(-F.logsigmoid(beta_b * gap), x) * keep.to(gap.dtype)  # [B], dropped pairs contribute 0
    out = paired_output(losses, x, beta, {"beta": beta_b, "gap_mean": g.new_tensor(m0),
                                          "gap_std": g.new_tensor(sigma), "kept_fraction": keep.mean()})
    out.loss = losses.sum() / keep.sum()
    return out


@register("dpop", paper="Pal et al. 2024 (Smaug, DPO-Positive), arXiv:2402.13228, Eq. 3",
          ranges={"dpop_lambda": NON_NEGATIVE})
def dpop(x: LossInputs, *, beta: float = 0.1, dpop_lambda: float = 50.0) -> LossOutput:
    """-log sigma(beta * (c - r - lambda * max(0, -c))), c/r = chosen/rejected log pi/pi_ref.

    The penalty max(0, log pi_ref(y_w) / pi(y_w)) is positive only when the policy makes the chosen answer
    *less* likely than the reference did, the failure mode of DPO on pairs with small edit distance. The
    paper uses lambda = 50 (also 5 and 500 in ablations). Metric ``positive_penalty``: the batch mean of
    max(0, -c).
    """
    c, r = logratios(x)
    penalty = torch.relu(-c)  # [B] max(0, log pi_ref(y_w|x) - log pi(y_w|x))
    losses = -F.logsigmoid(beta * (c - r - dpop_lambda * penalty))  # Eq. 3
    return paired_output(wpo(losses, x), x, beta, {"positive_penalty": penalty.detach().mean()})


@register("simper", paper="Xiao et al. 2025 (SimPER), arXiv:2502.00883, Eq. 6", requires_reference=False,
          length_normalized=True)
def simper(x: LossInputs) -> LossOutput:
    """-exp(mean log pi(y_w)) + exp(mean log pi(y_l)): inverse perplexities, no reference, no hyperparameter.

    exp(mean log-prob) = 1 / perplexity of the completion. Rewards are these inverse perplexities (in (0, 1]),
    so ``rewards/accuracies`` is the share of pairs whose chosen completion has the lower perplexity.
    """
    need(x, "simper", "chosen_logps", "rejected_logps")
    completion_lengths(x, "simper")  # the module passes averaged log-probs; lengths must be present
    assert x.chosen_logps is not None and x.rejected_logps is not None  # need() checked them
    pc, pr = torch.exp(x.chosen_logps), torch.exp(x.rejected_logps)  # [B] each, 1 / perplexity
    losses = -pc + pr  # Eq. 6
    return LossOutput(losses.mean(), losses, pc.detach(), pr.detach(), {})
