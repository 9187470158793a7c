"""Deprecated: moved to ``dpo_lightning.training.optim``.

Kept so that run folders written before the move (their ``config.yaml`` names
``dpo_lightning.optim.OptimizerSpec``, ...) still resume. New configs name the new module.
"""

import warnings

from dpo_lightning.training.optim import OptimizerSpec, SchedulerSpec  # noqa: F401  (old Hydra targets)

warnings.warn("dpo_lightning.optim moved to dpo_lightning.training.optim", DeprecationWarning, stacklevel=2)
