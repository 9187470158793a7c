"""Refuse invalid combinations of settings before any model loads, saying what to do instead.

``validate_config(cfg)`` reads the composed config and raises ``ConfigError`` on the first problem it finds;
``dpo-train`` and ``dpo-eval`` call it first. The checks live by area:

    values.py     loss hyperparameters, optimizer/scheduler/trainer/data basics, layout vs attention, generation
    reference.py  the reference against the loss, the adapters and TR-DPO's sync
    weights.py    bitsandbytes quantization and PEFT adapters
    hardware.py   accelerator, strategy, precision
    base.py       ``ConfigError``, ``_get`` and the environment probes they share
"""

from __future__ import annotations

from omegaconf import DictConfig

from dpo_lightning.config.base import ConfigError, uses_cuda
from dpo_lightning.config.hardware import PRECISIONS, check_accelerator, check_precision, check_strategy
from dpo_lightning.config.reference import check_reference_for_loss, check_reference_source, check_sync
from dpo_lightning.config.values import check_generation, check_layout, check_values, loss_from_config
from dpo_lightning.config.weights import check_adapter, check_lora, check_quantization

__all__ = ["PRECISIONS", "ConfigError", "loss_from_config", "uses_cuda", "validate_config"]


def validate_config(cfg: DictConfig, *, training: bool = True) -> None:
    """Raise ``ConfigError`` for a combination that cannot work. ``training=False`` (dpo-eval) skips the
    checks that only concern training (quantized weights without adapters, ...). The order is the order in
    which problems are reported."""
    check_values(cfg)  # every hyperparameter in its valid range
    check_layout(cfg)
    check_reference_for_loss(cfg)
    check_adapter(cfg, training=training)
    check_accelerator(cfg)
    kind = check_strategy(cfg)
    check_precision(cfg)
    check_quantization(cfg, kind, training=training)
    check_lora(cfg)
    check_reference_source(cfg)
    check_sync(cfg, kind)
    check_generation(cfg)
