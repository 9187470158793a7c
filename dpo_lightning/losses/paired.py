"""Paired, reference-based losses that score chosen and rejected log-ratios separately (no f-DPO).

TRL 1.16 ``DPOTrainer`` ``loss_type`` names and formulas; rewards are beta * log(pi/pi_ref). TRL rejects a
non-default ``f_divergence_type`` for these (the log Z(x) term would not cancel), so they do not take one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpo_lightning.losses.common import logratios, need, paired_output, wpo
from dpo_lightning.losses.registry import LossInputs, LossOutput, register


@register("nca_pair", paper="Chen et al. 2024 (NCA), arXiv:2402.05369, NCA loss for K=2 (Sec. 3)")
def nca_pair(x: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """-log sigma(r_c) - 1/2 log sigma(-r_c) - 1/2 log sigma(-r_r), r = beta * log-ratio."""
    c, r = logratios(x)
    rc, rr = beta * c, beta * r
    losses = -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
    return paired_output(wpo(losses, x), x, beta)


@register("bco_pair", paper="Jung et al. 2024 (BCO), arXiv:2404.04656, binary classifier loss on pairs "
          "(reward shift delta = 0, as TRL)")
def bco_pair(x: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """-log sigma(r_c) - log sigma(-r_r), r = beta * log-ratio: chosen classified 1, rejected 0."""
    c, r = logratios(x)
    losses = -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    return paired_output(wpo(losses, x), x, beta)


@register("sppo_hard", paper="Wu et al. 2024 (SPPO), arXiv:2405.00675, Eq. 4.7 of Algorithm 1 with hard "
          "probabilities P(chosen wins)=1")
def sppo_hard(x: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """(log-ratio_c - 1/(2 beta))^2 + (log-ratio_r + 1/(2 beta))^2."""
    c, r = logratios(x)
    losses = (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    return paired_output(wpo(losses, x), x, beta)


def _aot_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


@register("aot", paper="Melnyk et al. 2024 (AOT), arXiv:2406.05882, paired AOT: sorted log-ratio "
          "gaps (Sec. 3)", modifiers=("ld_alpha",))
def aot(x: LossInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Logistic loss on sort(log pi(c) - log pi(r)) - sort(log ref(c) - log ref(r)) across the batch.

    Optimal transport in 1-D is sorting, so example i of ``losses`` belongs to the i-th smallest gap,
    not to pair i (as in TRL). No WPO weighting: sorting would misalign the per-pair weights (TRL refuses it).
    """
    assert x.chosen_logps is not None and x.rejected_logps is not None  # paired inputs
    assert x.ref_chosen_logps is not None and x.ref_rejected_logps is not None  # a reference-based loss
    gaps = torch.sort(x.chosen_logps - x.rejected_logps, dim=0)[0]
    ref_gaps = torch.sort(x.ref_chosen_logps - x.ref_rejected_logps, dim=0)[0]
    return paired_output(_aot_loss(gaps - ref_gaps, beta, label_smoothing), x, beta)


@register("aot_unpaired", paper="Melnyk et al. 2024 (AOT), arXiv:2406.05882, unpaired AOT: sorted "
          "chosen vs. sorted rejected log-ratios (Sec. 3)", modifiers=("ld_alpha",))
def aot_unpaired(x: LossInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Logistic loss on sort(chosen log-ratios) - sort(rejected log-ratios) across the batch (see ``aot``)."""
    c, r = logratios(x)
    delta = torch.sort(c, dim=0)[0] - torch.sort(r, dim=0)[0]
    return paired_output(_aot_loss(delta, beta, label_smoothing), x, beta)


@register("apo_zero", paper="D'Oosterlinck et al. 2024 (APO), arXiv:2408.06266, Eq. 7 (APO-zero)")
def apo_zero(x: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """(1 - sigma(r_c)) + sigma(r_r): push chosen up and rejected down (chosen better than the model)."""
    c, r = logratios(x)
    losses = 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    return paired_output(wpo(losses, x), x, beta)


@register("apo_down", paper="D'Oosterlinck et al. 2024 (APO), arXiv:2408.06266, Eq. 8 (APO-down)")
def apo_down(x: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """sigma(r_c) + (1 - sigma(r_c - r_r)): push both down, rejected more (chosen worse than the model)."""
    c, r = logratios(x)
    losses = torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))
    return paired_output(wpo(losses, x), x, beta)


@register("sft", paper="Supervised NLL on the chosen completions (TRL DPOTrainer loss_type='sft'; the NLL "
          "term of RPO, Pang et al. 2024, arXiv:2404.19733, and MPO)")
def sft(x: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """Token-mean NLL over every chosen completion token of the batch, repeated per pair ([B]).

    ``beta`` only scales the logged rewards (beta * log-ratio, as TRL logs them for ``sft``). The reference
    is used for those rewards only; alone, ``sft`` still loads one (TRL parity), in RPO/MPO it is shared.
    """
    need(x, "sft", "chosen_nll", "chosen_logps")
    assert x.chosen_nll is not None and x.chosen_logps is not None  # need() checked them
    losses = x.chosen_nll.expand(x.chosen_logps.shape[0])
    return paired_output(wpo(losses, x), x, beta, {"nll_loss": x.chosen_nll.detach()})
