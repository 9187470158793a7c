"""Checks of how the policy's weights are held and trained: bitsandbytes quantization and PEFT adapters."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from omegaconf import DictConfig

from dpo_lightning.config import base
from dpo_lightning.config.base import ConfigError, _get, has_peft


def check_quantization(cfg: DictConfig, kind: str, *, training: bool) -> None:
    """``model.quantization`` / ``reference.quantization``: valid settings, bitsandbytes with kernels for this
    hardware, an unsharded strategy; training quantized weights needs adapters (QLoRA)."""
    from dpo_lightning.models.quantization import bnb_kwargs, quantization_bits
    from dpo_lightning.training.strategies import SHARDED_KINDS

    cuda = base.uses_cuda(cfg)
    for where in ("model.quantization", "reference.quantization"):
        settings = _get(cfg, where)
        try:
            bits = quantization_bits(settings)
            if bits:
                bnb_kwargs(settings)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        if not bits:
            continue
        if not base.installed("bitsandbytes"):
            raise ConfigError(f"{where}: {bits}-bit quantization needs bitsandbytes: pip install 'bitsandbytes>=0.46' "
                              "(or quantization=none)")
        if not cuda and base.package_version("bitsandbytes") < (0, 46):
            raise ConfigError(f"{where}: bitsandbytes {importlib.metadata.version('bitsandbytes')} has no CPU "
                              "kernels; upgrade to bitsandbytes>=0.46 or run on a GPU")
        if kind in SHARDED_KINDS:
            raise ConfigError(f"{where}: bitsandbytes {bits}-bit weights do not shard with strategy={kind}; use "
                              "strategy=ddp (every GPU holds the small quantized model) or quantization=none")
        compute = str((settings or {}).get("compute_dtype", (settings or {}).get("bnb_4bit_compute_dtype", "")))
        if compute.startswith("bf") and cuda and base.cuda_available() and not base.bf16_supported():
            raise ConfigError(f"{where}.compute_dtype={compute}: this GPU has no bfloat16; use float16")
    bits = quantization_bits(_get(cfg, "model.quantization"))
    if training and bits and not has_peft(cfg):
        raise ConfigError(f"quantization: {bits}-bit weights cannot be fully fine-tuned; train LoRA adapters on top "
                          f"(peft=lora, i.e. QLoRA) or load full weights (quantization=none)")


def check_adapter(cfg: DictConfig, *, training: bool) -> None:
    """``peft.adapter_path`` names a saved adapter; ``dpo-eval`` with adapters evaluates a trained one."""
    if not has_peft(cfg):
        return
    path = _get(cfg, "peft").get("adapter_path")
    if path:
        local = Path(str(path)).expanduser()
        if (local.exists() or str(path).startswith((".", "/", "~"))) and not (local / "adapter_config.json").is_file():
            raise ConfigError(f"peft.adapter_path={path}: no adapter_config.json there; point it at a folder written "
                              "by save_pretrained of a PEFT model (dpo-train's export with export_merged=false)")
    elif not training:
        raise ConfigError("dpo-eval with peft=lora would evaluate fresh adapters (B = 0: the policy equals its base); "
                          "set peft.adapter_path=<the trained adapter folder, e.g. outputs/train/runs/<run>/export>, "
                          "or evaluate a merged export with peft=none")


def check_lora(cfg: DictConfig) -> None:
    """The ``peft`` node builds a ``LoraConfig``."""
    if not has_peft(cfg):
        return
    from dpo_lightning.models.peft import lora_config

    try:
        lora_config(_get(cfg, "peft"))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"peft: {err}") from None
