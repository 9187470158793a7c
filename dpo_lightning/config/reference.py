"""Checks of the reference: where it comes from, against the loss, the adapters and TR-DPO's sync."""

from __future__ import annotations

from omegaconf import DictConfig

from dpo_lightning.config.base import ConfigError, _get, has_peft
from dpo_lightning.config.values import loss_from_config
from dpo_lightning.reference.spec import precompute_refusal


def check_reference_for_loss(cfg: DictConfig) -> None:
    """The reference mode, precompute and dtype against the loss, before any model loads."""
    loss = loss_from_config(cfg)
    if loss is None:
        return
    mode = _get(cfg, "reference.mode", "auto")
    if mode == "none" and loss.requires_reference:
        raise ConfigError(f"reference.mode=none, but loss {loss.name!r} needs a reference model; use "
                          "reference.mode=auto or a reference-free loss (orpo, simpo, cpo, alphapo)")
    precompute = bool(_get(cfg, "reference.precompute")) and loss.requires_reference
    if precompute and loss.needs_kl_pairs:
        raise ConfigError(precompute_refusal(loss.name))
    adapter = has_peft(cfg) and mode in ("auto", "adapter") and not _get(cfg, "reference.name_or_path")
    if _get(cfg, "reference.dtype") and adapter and loss.requires_reference and not precompute:
        raise ConfigError(f"reference.dtype={_get(cfg, 'reference.dtype')} applies to a separately loaded reference, "
                          "but with peft=lora the reference is the policy with its adapters disabled (the policy's "
                          "dtype); set reference.mode=copy to load a reference in that dtype, or drop reference.dtype")


def check_reference_source(cfg: DictConfig) -> None:
    """``reference.mode=adapter`` needs adapters; a quantized reference must be a separately loaded one."""
    from dpo_lightning.models.quantization import quantization_bits

    mode = _get(cfg, "reference.mode", "auto")
    if mode == "adapter" and not has_peft(cfg):
        raise ConfigError("reference.mode=adapter uses the policy with its LoRA adapters disabled, but there are "
                          "none: add peft=lora, or use reference.mode=auto/copy")
    if quantization_bits(_get(cfg, "reference.quantization")) and has_peft(cfg) and mode in ("auto", "adapter") \
            and not _get(cfg, "reference.name_or_path"):
        raise ConfigError("reference.quantization applies to a separately loaded reference, but with peft=lora the "
                          "reference is the policy with adapters disabled; set reference.mode=copy (or model) to "
                          "load a quantized reference, or drop reference.quantization")


def check_sync(cfg: DictConfig, kind: str) -> None:
    """TR-DPO (``reference.sync``): valid settings, a live reference, a strategy and weights it can mix into."""
    from dpo_lightning.models.quantization import quantization_bits
    from dpo_lightning.reference.sync import sync_settings

    try:
        sync = sync_settings(_get(cfg, "reference.sync"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not sync:
        return
    if _get(cfg, "reference.precompute"):
        raise ConfigError("reference.sync (TR-DPO) moves the reference during training, but reference.precompute=true "
                          "reads its log-probs once from a cache: set reference.precompute=false, or "
                          "reference.sync.every_n_steps=0")
    if kind == "deepspeed":
        raise ConfigError("reference.sync (TR-DPO) runs under strategy auto, ddp, fsdp and fsdp2, not DeepSpeed "
                          "(its partitioned parameters are not addressable in place); use strategy=fsdp")
    if quantization_bits(_get(cfg, "reference.quantization")):
        raise ConfigError("reference.sync mixes policy weights into the reference, which cannot be quantized: "
                          "drop reference.quantization")
