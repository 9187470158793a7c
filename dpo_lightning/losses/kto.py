"""Unpaired losses on (prompt, completion, label) rows: KTO and APO-zero (unpaired).

TRL 1.16 ``KTOTrainer`` (``loss_type='kto'`` / ``'apo_zero_unpaired'``). Paired data is split into
unpaired rows by the data module (``paired=False``). ``chosen_rewards`` / ``rejected_rewards`` hold the
rewards of the desirable / undesirable rows (either may be empty); per-example ``losses`` stay in batch
order (TRL concatenates desirable then undesirable rows; the mean is the same).
"""

from __future__ import annotations

import torch

from dpo_lightning.losses.common import dist_mean, need, split_rewards, unpaired_metrics
from dpo_lightning.losses.registry import LossInputs, LossOutput, register


def kl_estimate(x: LossInputs) -> torch.Tensor:
    """TRL KTOTrainer's KL term: mean over the batch (and ranks) of log pi/pi_ref on the mismatched
    (prompt i, completion i-1) rows, clamped at 0 and detached. Needs at least 2 rows."""
    assert x.logps is not None  # kto's need() checked it
    n = x.logps.shape[0]
    if n < 2:
        raise ValueError(f"kto: a batch of {n} example cannot estimate the KL term (it needs completions of other "
                         "prompts in the same batch, so >= 2 rows); use data.batch_size >= 2 and drop a last "
                         "batch of 1 (or use loss=apo_zero_unpaired, which needs no KL)")
    if x.kl_logps is None or x.ref_kl_logps is None:
        raise ValueError("kto needs the mismatched KL rows: build the data module with kl_pairs=True "
                         "(the training entry point does so from Loss.needs_kl_pairs)")
    return dist_mean((x.kl_logps - x.ref_kl_logps).detach().mean()).clamp(min=0)


@register("kto", paper="Ethayarajh et al. 2024 (KTO), arXiv:2402.01306, Eq. 7", paired=False, needs_kl_pairs=True)
def kto(x: LossInputs, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> LossOutput:
    """lambda_D (1 - sigma(beta (r - z0))) for desirable rows, lambda_U (1 - sigma(beta (z0 - r))) otherwise.

    r = log pi/pi_ref of the row, z0 = ``kl_estimate`` (no gradient). The paper suggests
    lambda_D n_D / (lambda_U n_U) in [1, 4/3] when the classes are imbalanced.
    """
    need(x, "kto", "logps", "ref_logps", "labels")
    assert x.logps is not None and x.ref_logps is not None and x.labels is not None  # need() checked them
    z0 = kl_estimate(x)
    logratio = x.logps - x.ref_logps  # [B]
    labels = x.labels.bool()
    losses = torch.where(labels, desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio))))
    chosen, rejected = split_rewards(beta * logratio.detach(), labels)
    return LossOutput(losses.mean(), losses, chosen, rejected, {"kl": z0, **unpaired_metrics(chosen, rejected)})


@register("apo_zero_unpaired", paper="D'Oosterlinck et al. 2024 (APO), arXiv:2408.06266, unpaired variant of "
          "Eq. 7", paired=False)
def apo_zero_unpaired(x: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """1 - sigma(beta r) for desirable rows, sigma(beta r) for undesirable ones; no KL term (logged as 0)."""
    need(x, "apo_zero_unpaired", "logps", "ref_logps", "labels")
    assert x.logps is not None and x.ref_logps is not None and x.labels is not None  # need() checked them
    logratio = x.logps - x.ref_logps
    labels = x.labels.bool()
    losses = torch.where(labels, 1 - torch.sigmoid(beta * logratio), torch.sigmoid(beta * logratio))
    chosen, rejected = split_rewards(beta * logratio.detach(), labels)
    metrics = {"kl": logratio.new_zeros(()), **unpaired_metrics(chosen, rejected)}
    return LossOutput(losses.mean(), losses, chosen, rejected, metrics)
