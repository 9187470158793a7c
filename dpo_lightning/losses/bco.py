"""BCO: binary classifier optimization on unpaired rows, with a running reward mean as the decision shift.

Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment", arXiv:2404.04656,
Sec. 3 (reward shift delta). TRL 1.16 no longer ships a BCOTrainer; semantics follow the last TRL one
(``BCOTrainer.bco_loss`` with ``RunningMoments``). Departure: the optional underlying-distribution-matching
weights (a prompt-embedding classifier, ``match_underlying_distribution``) are not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpo_lightning.losses.common import need, split_rewards, unpaired_metrics
from dpo_lightning.losses.registry import LossInputs, LossOutput, register

MEAN, COUNT = "bco/reward_mean", "bco/reward_count"


def update_running_mean(state: dict, rewards: torch.Tensor) -> None:
    """TRL RunningMoments.update, mean part: the count-weighted mean of every reward seen in training.

    Pooled over data-parallel ranks (sum and count all-reduced) as TRL gathers them. State holds floats.
    """
    stats = torch.stack([rewards.detach().double().sum(), torch.tensor(float(rewards.numel()),
                                                                        dtype=torch.float64, device=rewards.device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    total, n = float(stats[0]), float(stats[1])
    if n == 0:
        return
    mean, count = float(state.get(MEAN, 0.0)), float(state.get(COUNT, 1e-24))
    tot = count + n
    state[MEAN] = mean + (total / n - mean) * n / tot
    state[COUNT] = tot


@register("bco", paper="Jung et al. 2024 (BCO), arXiv:2404.04656, Sec. 3 (running-mean reward shift)", paired=False)
def bco(x: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """-log sigma(r - delta) for desirable rows, -log sigma(-(r - delta)) otherwise; r = beta log pi/pi_ref.

    delta is the running mean of all rewards seen in training (``x.state``, checkpointed by the module),
    updated with this batch first, as TRL does. It is updated only when gradients flow (training steps);
    validation reads it unchanged, as TRL's ``do_train=False``.
    """
    need(x, "bco", "logps", "ref_logps", "labels")
    assert x.logps is not None and x.ref_logps is not None and x.labels is not None  # need() checked them
    rewards = beta * (x.logps - x.ref_logps)  # [B]
    if torch.is_grad_enabled() and rewards.requires_grad:
        update_running_mean(x.state, rewards)
    delta = torch.tensor(float(x.state.get(MEAN, 0.0)), dtype=rewards.dtype, device=rewards.device)
    labels = x.labels.bool()
    losses = torch.where(labels, -F.logsigmoid(rewards - delta), -F.logsigmoid(-(rewards - delta)))
    chosen, rejected = split_rewards(rewards.detach(), labels)
    return LossOutput(losses.mean(), losses, chosen, rejected, {"delta": delta, **unpaired_metrics(chosen, rejected)})
