"""DPO with a sigmoid (logistic) loss and cDPO label smoothing.

Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
https://arxiv.org/abs/2305.18290 ; cDPO: Mitchell, 2023, "A note on DPO with noisy preferences".
"""

from __future__ import annotations

import torch.nn.functional as F

from dpo_lightning.losses.registry import LossInputs, LossOutput, register


def logratios(x: LossInputs):
    """(chosen, rejected) log-ratios log pi/pi_ref of the policy against the reference, each [B]."""
    return x.chosen_logps - x.ref_chosen_logps, x.rejected_logps - x.ref_rejected_logps


def reference_rewards(x: LossInputs, beta: float):
    """TRL's implicit rewards beta * log(pi/pi_ref), detached, each [B]."""
    c, r = logratios(x)
    return beta * c.detach(), beta * r.detach()


@register("sigmoid", paper="Rafailov et al. 2023 (DPO), arXiv:2305.18290, Eq. 7; cDPO label smoothing")
def sigmoid(x: LossInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """-(1-eps) log sigma(beta * delta) - eps log sigma(-beta * delta), delta = chosen - rejected log-ratio.

    Shapes: every tensor in ``x`` is [B]; returns per-example losses [B].
    TRL 1.16 dropped label smoothing from ``sigmoid``; at ``label_smoothing=0`` (default) the numbers are TRL's.
    """
    c, r = logratios(x)
    logits = beta * (c - r)  # [B]
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)  # Eq. 7 (+cDPO)
    chosen_rewards, rejected_rewards = reference_rewards(x, beta)
    return LossOutput(losses.mean(), losses, chosen_rewards, rejected_rewards)
