"""Deprecated: moved to ``dpo_lightning.training.strategies``.

Kept so that run folders written before the move (their ``config.yaml`` names
``dpo_lightning.strategies.FSDPStrategy``, ...) still resume. New configs name the new module.
"""

import warnings

from dpo_lightning.training.strategies import (  # noqa: F401  (re-exported for old Hydra targets)
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    build_strategy,
    decoder_layer_classes,
    strategy_kind,
)

warnings.warn("dpo_lightning.strategies moved to dpo_lightning.training.strategies", DeprecationWarning,
              stacklevel=2)
