"""Optimizer and learning-rate schedule from plain settings (any ``torch.optim`` class by name)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class OptimizerSpec:
    """``optimizer`` config group. name: a ``torch.optim`` class (AdamW, Adam, SGD, ...) or a dotted path.

    Adam and AdamW use torch's fused kernel wherever it takes the parameters (CPU, CUDA; not DTensor shards)
    unless ``kwargs`` names ``fused`` or ``foreach``: the same update in one kernel per parameter, with none of
    the single-tensor path's parameter-sized temporaries (~2x the largest parameter, 100 MB for a 50k x 256
    embedding) nor the ``foreach`` path's copies of every parameter, so the optimizer step stays below the
    step's peak memory. ``optimizer.kwargs.fused=false`` turns it off.
    """

    name: str = "AdamW"
    lr: float = 5e-7
    weight_decay: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments (betas, eps, ...)

    def build(self, params) -> torch.optim.Optimizer:
        if "." in self.name:
            import importlib

            mod, _, cls = self.name.rpartition(".")
            klass = getattr(importlib.import_module(mod), cls)
        else:
            klass = getattr(torch.optim, self.name, None)
            if klass is None:
                raise ValueError(f"optimizer.name={self.name!r} is not a torch.optim class")
        kwargs = dict(self.kwargs)
        if klass in (torch.optim.Adam, torch.optim.AdamW) and not {"fused", "foreach"} & set(kwargs):
            params = list(params)
            try:  # TRL's default too; off: optimizer.kwargs.fused=false
                return klass(params, lr=self.lr, weight_decay=self.weight_decay, fused=True, **kwargs)
            except (RuntimeError, ValueError):  # parameters the fused kernel does not take (e.g. DTensor shards)
                pass
        return klass(params, lr=self.lr, weight_decay=self.weight_decay, **kwargs)


@dataclass
class SchedulerSpec:
    """``scheduler`` config group: linear warmup then ``constant`` | ``linear`` | ``cosine`` decay to
    ``min_lr_ratio`` x lr at the last step. ``warmup_ratio`` is used when ``warmup_steps`` is 0."""

    name: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0

    def build(self, optimizer: torch.optim.Optimizer, total_steps: int):
        if self.name not in ("constant", "linear", "cosine"):
            raise ValueError(f"scheduler.name={self.name!r}: use constant, linear or cosine")
        total = max(int(total_steps), 1)
        warmup = self.warmup_steps or int(round(self.warmup_ratio * total))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if self.name == "constant":
                return 1.0
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            decay = 1 - progress if self.name == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
