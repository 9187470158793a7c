"""Value checks: every loss hyperparameter (ranges from the loss registry), the optimizer, scheduler, trainer
and data basics, the data layout against the attention kernel, and the generation settings. Each message names
``key=value`` and says what to do instead. The module keeps its own checks too (plain-Python users).
"""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from dpo_lightning.config.base import ConfigError, _get
from dpo_lightning.data.layouts import PREFIX_SHARED, SHARED_LAYOUTS
from dpo_lightning.losses.registry import NON_NEGATIVE, POSITIVE, UNIT, Range

# key -> valid range, for the optimizer, scheduler, trainer and data basics (None values are skipped).
BASICS: dict[str, Range] = {
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE,
    "scheduler.warmup_ratio": UNIT,
    "scheduler.warmup_steps": NON_NEGATIVE,
    "scheduler.min_lr_ratio": UNIT,
    "trainer.accumulate_grad_batches": Range(1, math.inf, hi_open=True),
    "trainer.gradient_clip_val": NON_NEGATIVE,
    "data.batch_size": Range(1, math.inf, hi_open=True),
    "data.eval_batch_size": Range(1, math.inf, hi_open=True),
    "data.val_fraction": Range(0, 1, hi_open=True),
}


def loss_from_config(cfg: DictConfig):
    """The ``Loss`` the ``loss`` node describes (``get_loss`` checks names and ranges), or None."""
    from dpo_lightning.losses.registry import get_loss

    node = _get(cfg, "loss")
    if not isinstance(node, dict) or "name" not in node:
        return None
    hparams = {k: v for k, v in node.items() if not k.startswith("_") and k != "name"}
    return get_loss(node["name"], **hparams)


def check_values(cfg: DictConfig) -> None:
    """A loss hyperparameter or a basic setting outside its valid range."""
    try:
        loss_from_config(cfg)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(str(err).strip("'\"")) from None
    for key, rng in BASICS.items():
        value = _get(cfg, key)
        if value is None or OmegaConf.select(cfg, key.split(".")[0]) is None:
            continue
        if value not in rng:
            raise ConfigError(f"{key}={value}: must lie in {rng}")
    for name in ("max_length", "max_prompt_length"):  # the same words as TruncationConfig (plain-Python users)
        value = _get(cfg, f"data.{name}")
        if value is not None and OmegaConf.select(cfg, "data") is not None and int(value) < 2:
            raise ConfigError(f"data.{name}={value}: must be at least 2 (or null for no limit)")


def check_layout(cfg: DictConfig) -> None:
    """A layout that shares the prompt (4D attention mask) needs a kernel that takes such a mask."""
    layout = _get(cfg, "data.layout", PREFIX_SHARED)
    attn = str(_get(cfg, "model.attn_implementation") or "")
    if attn.startswith("flash") and layout in SHARED_LAYOUTS:
        raise ConfigError(f"data.layout={layout} shares each prompt between its completions through a 4D attention "
                          f"mask, which model.attn_implementation={attn} does not take; use "
                          "data.layout=packed_unshared (padding-free, flash varlen) or plain, or attn_implementation=sdpa")


def check_generation(cfg: DictConfig) -> None:
    """The ``generation`` node builds ``GenerationSettings``; a callable judge imports now, not at the first
    validation."""
    generation = _get(cfg, "generation")
    if not generation:
        return
    from dpo_lightning.evaluation.generation import GenerationSettings

    try:
        settings = GenerationSettings(**{k: v for k, v in generation.items() if k != "_target_"})
        if settings.num_prompts and settings.judge and ":" in str(settings.judge):
            from dpo_lightning.evaluation.judges import build_judge

            build_judge(settings.judge)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
