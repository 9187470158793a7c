"""Helpers shared by the loss families: log-ratios, TRL's reward conventions, WPO weights, checks."""

from __future__ import annotations

import torch

from dpo_lightning.losses.registry import LossInputs, LossOutput


def need(x: LossInputs, loss: str, *fields: str) -> None:
    """Raise a clear error when a loss is handed inputs without the fields it reads."""
    missing = [f for f in fields if getattr(x, f) is None]
    if missing:
        raise ValueError(f"loss {loss!r} needs LossInputs.{', '.join(missing)} (got None); "
                         "is the data paired/unpaired as the loss expects, and is a reference available?")


def logratios(x: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-ratios log pi/pi_ref of the policy against the reference, each [B]."""
    assert x.chosen_logps is not None and x.rejected_logps is not None  # paired inputs
    assert x.ref_chosen_logps is not None and x.ref_rejected_logps is not None  # a reference-based loss
    return x.chosen_logps - x.ref_chosen_logps, x.rejected_logps - x.ref_rejected_logps


def reference_rewards(x: LossInputs, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL DPOTrainer's implicit rewards beta * log(pi/pi_ref), detached, each [B]."""
    c, r = logratios(x)
    return beta * c.detach(), beta * r.detach()


def policy_rewards(x: LossInputs, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL CPO/ORPO trainers' rewards of reference-free losses: beta * policy log-probs, detached, each [B]."""
    assert x.chosen_logps is not None and x.rejected_logps is not None  # paired inputs
    return beta * x.chosen_logps.detach(), beta * x.rejected_logps.detach()


def rewards(x: LossInputs, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference rewards when reference log-probs are present, otherwise policy rewards."""
    if x.ref_chosen_logps is None:
        return policy_rewards(x, beta)
    return reference_rewards(x, beta)


def completion_lengths(x: LossInputs, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion token counts (chosen, rejected) as floats, at least 1 (TRL's ``clamp(min=1.0)``)."""
    need(x, loss, "chosen_lengths", "rejected_lengths")
    assert x.chosen_lengths is not None and x.rejected_lengths is not None and x.chosen_logps is not None
    return x.chosen_lengths.clamp(min=1).to(x.chosen_logps.dtype), x.rejected_lengths.clamp(min=1).to(
        x.chosen_logps.dtype)


def wpo(losses: torch.Tensor, x: LossInputs) -> torch.Tensor:
    """WPO (Zhou et al. 2024, arXiv:2406.11827, Eq. 2): per-pair losses times w_chosen * w_rejected.

    The module fills ``chosen_weights``/``rejected_weights`` only when the loss has ``use_weighting=True``,
    so a loss simply weights whenever they are present, as TRL does after each loss term.
    """
    if x.chosen_weights is None:
        return losses
    assert x.rejected_weights is not None  # the module fills both or neither
    return losses * (x.chosen_weights * x.rejected_weights).to(losses.dtype)


def paired_output(losses: torch.Tensor, x: LossInputs, beta: float,
                  metrics: dict[str, torch.Tensor] | None = None) -> LossOutput:
    """``LossOutput`` of a paired loss: mean loss, per-pair losses and TRL's rewards."""
    chosen_rewards, rejected_rewards = rewards(x, beta)
    return LossOutput(losses.mean(), losses, chosen_rewards, rejected_rewards, metrics or {})


def dist_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar over data-parallel ranks (TRL's ``gather_for_metrics(v).mean()``); identity alone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        value = value / torch.distributed.get_world_size()
    return value


def split_rewards(rewards: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpaired rewards [B] -> (desirable rows, undesirable rows); either may be empty."""
    labels = labels.bool()
    return rewards[labels], rewards[~labels]


def unpaired_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """``rewards/margins`` of an unpaired batch, only when both groups are present (as TRL's KTOTrainer)."""
    if chosen.numel() and rejected.numel():
        return {"rewards/margins": chosen.mean() - rejected.mean()}
    return {}
