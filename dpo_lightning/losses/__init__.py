"""Preference losses: importing this package registers every family in ``LOSSES``."""

from dpo_lightning.losses import (  # noqa: F401  (registers)
    adaptive,
    bco,
    combination,
    dpo,
    kto,
    paired,
    reference_free,
)
from dpo_lightning.losses.registry import LOSSES, Loss, LossInputs, LossOutput, LossSpec, get_loss, register

__all__ = ["LOSSES", "Loss", "LossInputs", "LossOutput", "LossSpec", "get_loss", "register"]
