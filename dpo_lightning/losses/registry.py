"""The loss registry: every preference objective is a small pure function plus its metadata.

A loss function takes a ``LossInputs`` and keyword hyperparameters and returns a ``LossOutput``.
Its metadata travels with it (``LossSpec``): does it need a reference, is the data paired, are the
sequence log-probs length-normalized before the loss sees them. The module reads only metadata; it never
branches on a loss name.

    get_loss("sigmoid", beta=0.1)    # -> Loss, a picklable callable carrying spec + hyperparameters
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LossInputs:
    """Everything a loss may read. Paired losses: B pairs; unpaired: B completions (+ optional KL rows).

    Sequence log-probs are sums over completion tokens, or means when the loss is ``length_normalized``.
    """

    chosen_logps: torch.Tensor | None = None  # [B]
    rejected_logps: torch.Tensor | None = None  # [B]
    ref_chosen_logps: torch.Tensor | None = None  # [B]
    ref_rejected_logps: torch.Tensor | None = None  # [B]
    chosen_lengths: torch.Tensor | None = None  # [B] completion tokens
    rejected_lengths: torch.Tensor | None = None  # [B]
    chosen_nll: torch.Tensor | None = None  # [] token-mean NLL of the chosen completions (TRL's nll_loss)
    chosen_weights: torch.Tensor | None = None  # [B] WPO: exp(mean aligned log-prob), no grad
    rejected_weights: torch.Tensor | None = None  # [B]
    # unpaired (KTO, BCO, ...)
    logps: torch.Tensor | None = None  # [B]
    ref_logps: torch.Tensor | None = None  # [B]
    labels: torch.Tensor | None = None  # [B] bool, True = desirable
    kl_logps: torch.Tensor | None = None  # [B] mismatched (prompt i, completion i-1) pairs
    ref_kl_logps: torch.Tensor | None = None  # [B]
    state: dict[str, Any] = field(default_factory=dict)  # running statistics a loss keeps (BCO's reward mean)


@dataclass
class LossOutput:
    """Scalar loss to backpropagate, per-example losses and rewards (detached) and extra metrics."""

    loss: torch.Tensor  # []
    losses: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B] (paired) or rewards of desirable rows (unpaired)
    rejected_rewards: torch.Tensor  # [B] (paired) or rewards of undesirable rows (unpaired)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. {"nll_loss": ..., "kl": ...}


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., LossOutput]
    paper: str
    requires_reference: bool = True
    paired: bool = True
    length_normalized: bool = False


LOSSES: dict[str, LossSpec] = {}


def register(name: str, *, paper: str, requires_reference: bool = True, paired: bool = True,
             length_normalized: bool = False):
    """Decorator: add ``fn`` to ``LOSSES`` under ``name`` with its metadata."""

    def wrap(fn):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSSES[name] = LossSpec(name, fn, paper, requires_reference, paired, length_normalized)
        return fn

    return wrap


@dataclass
class Loss:
    """A registry entry bound to hyperparameters. Picklable (it stores the name, not the function)."""

    name: str
    hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> LossSpec:
        return LOSSES[self.name]

    @property
    def requires_reference(self) -> bool:
        return self.spec.requires_reference

    @property
    def paired(self) -> bool:
        return self.spec.paired

    @property
    def length_normalized(self) -> bool:
        return self.spec.length_normalized

    @property
    def beta(self) -> float:
        return float(self.hparams.get("beta", 0.1))

    def __call__(self, inputs: LossInputs) -> LossOutput:
        return self.spec.fn(inputs, **self.hparams)


MODIFIERS = ("ld_alpha", "use_weighting")  # read by the module when it builds LossInputs


def get_loss(name: str, **hparams: Any) -> Loss:
    """Bind registry entry ``name`` to hyperparameters, checking them against the function's signature."""
    import dpo_lightning.losses  # noqa: F401  (registers every family)

    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; available: {', '.join(sorted(LOSSES))}")
    params = inspect.signature(LOSSES[name].fn).parameters
    accepted = {k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = set(hparams) - accepted - set(MODIFIERS)
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise TypeError(f"loss {name!r} got unknown hyperparameter(s) {sorted(unknown)}; "
                        f"it accepts {sorted(accepted | set(MODIFIERS))}")
    defaults = {k: p.default for k, p in params.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}
    return Loss(name, {**defaults, **hparams})
