"""Value checks of a composed config (called by ``validate_config`` before any model loads).

    check_values(cfg)     every loss hyperparameter (ranges from the loss registry), the optimizer and
                          scheduler basics, batch sizes: ``ConfigError`` naming ``key=value`` and the range
    check_reference(cfg)  where the reference comes from, against the loss, the layout and adapters

Each message says what to do instead. The module keeps its own checks too (plain-Python users).
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

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


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def loss_from_config(cfg: DictConfig):
    """The ``Loss`` the ``loss`` node describes (``get_loss`` checks names and ranges), or None."""
    from dpo_lightning.losses.registry import get_loss

    node = _get(cfg, "loss")
    if not isinstance(node, dict) or "name" not in node:
        return None
    hparams = {k: v for k, v in node.items() if not k.startswith("_") and k != "name"}
    return get_loss(node["name"], **hparams)


def check_values(cfg: DictConfig, error: type[Exception]) -> None:
    """Raise ``error`` for a loss hyperparameter or a basic setting outside its valid range."""
    try:
        loss_from_config(cfg)
    except (ValueError, TypeError, KeyError) as err:
        raise error(str(err).strip("'\"")) from None
    for key, rng in BASICS.items():
        value = _get(cfg, key)
        if value is None or OmegaConf.select(cfg, key.split(".")[0]) is None:
            continue
        if value not in rng:
            raise error(f"{key}={value}: must lie in {rng}")


def check_adapter(cfg: DictConfig, error: type[Exception], *, training: bool) -> None:
    """``peft.adapter_path`` names a saved adapter; ``dpo-eval`` with adapters evaluates a trained one."""
    peft = _get(cfg, "peft")
    if not peft or peft.get("method", "lora") in (None, "none"):
        return
    path = peft.get("adapter_path")
    if path:
        from pathlib import Path

        local = Path(str(path)).expanduser()
        if (local.exists() or str(path).startswith((".", "/", "~"))) and not (local / "adapter_config.json").is_file():
            raise error(f"peft.adapter_path={path}: no adapter_config.json there; point it at a folder written by "
                        "save_pretrained of a PEFT model (dpo-train's export with export_merged=false)")
    elif not training:
        raise error("dpo-eval with peft=lora would evaluate fresh adapters (B = 0: the policy equals its base); set "
                    "peft.adapter_path=<the trained adapter folder, e.g. outputs/train/runs/<run>/export>, or "
                    "evaluate a merged export with peft=none")


def check_reference(cfg: DictConfig, error: type[Exception]) -> None:
    """The checks that used to run only once the model had loaded."""
    loss = loss_from_config(cfg)
    layout = _get(cfg, "data.layout", PREFIX_SHARED)
    attn = str(_get(cfg, "model.attn_implementation") or "")
    if attn.startswith("flash") and layout in SHARED_LAYOUTS:
        raise error(f"data.layout={layout} shares each prompt between its completions through a 4D attention "
                    f"mask, which model.attn_implementation={attn} does not take; use data.layout=packed_unshared "
                    "(padding-free, flash varlen) or plain, or attn_implementation=sdpa")
    if loss is None:
        return
    mode = _get(cfg, "reference.mode", "auto")
    if mode == "none" and loss.requires_reference:
        raise error(f"reference.mode=none, but loss {loss.name!r} needs a reference model; use reference.mode=auto "
                    "or a reference-free loss (orpo, simpo, cpo, alphapo)")
    precompute = bool(_get(cfg, "reference.precompute")) and loss.requires_reference
    if precompute and loss.needs_kl_pairs:
        raise error(f"reference.precompute=true cannot serve loss {loss.name!r}: its KL rows pair prompt i with "
                    "completion i-1 of the same batch, which depends on the batching; set reference.precompute=false")
    peft = _get(cfg, "peft")
    has_peft = bool(peft) and peft.get("method", "lora") not in (None, "none")
    adapter = has_peft and mode in ("auto", "adapter") and not _get(cfg, "reference.name_or_path")
    if _get(cfg, "reference.dtype") and adapter and loss.requires_reference and not precompute:
        raise error(f"reference.dtype={_get(cfg, 'reference.dtype')} applies to a separately loaded reference, but "
                    "with peft=lora the reference is the policy with its adapters disabled (the policy's dtype); "
                    "set reference.mode=copy to load a reference in that dtype, or drop reference.dtype")
