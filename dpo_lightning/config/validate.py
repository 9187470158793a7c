"""Refuse invalid combinations of settings before any model loads, saying what to do instead.

``validate_config(cfg)`` reads the composed config (strategy, trainer, model.quantization, peft, reference)
and raises ``ConfigError`` on the first problem it finds. ``dpo-train`` and ``dpo-eval`` call it first.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any

from omegaconf import DictConfig, OmegaConf

PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed")


class ConfigError(ValueError):
    """An invalid combination of settings, reported before any model loads."""


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _version(name: str) -> tuple[int, ...]:
    try:
        parts = importlib.metadata.version(name).split(".")[:2]
        return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)
    except importlib.metadata.PackageNotFoundError:
        return ()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def uses_cuda(cfg: DictConfig) -> bool:
    """Whether the run will be on CUDA GPUs (``trainer.accelerator`` gpu/cuda, or auto with a GPU visible)."""
    accelerator = str(_get(cfg, "trainer.accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and _cuda_available()


def validate_config(cfg: DictConfig, *, training: bool = True) -> None:
    """Raise ``ConfigError`` for a combination that cannot work. ``training=False`` (dpo-eval) skips the
    checks that only concern training (quantized weights without adapters, ...)."""
    from dpo_lightning.config.checks import check_adapter, check_reference, check_values
    from dpo_lightning.models.quantization import bnb_kwargs, quantization_bits
    from dpo_lightning.training.strategies import SHARDED_KINDS, strategy_kind

    check_values(cfg, ConfigError)  # every hyperparameter in its valid range
    check_reference(cfg, ConfigError)
    check_adapter(cfg, ConfigError, training=training)
    accelerator = str(_get(cfg, "trainer.accelerator", "auto")).lower()
    cuda = uses_cuda(cfg)
    if accelerator in ("gpu", "cuda") and not _cuda_available():
        raise ConfigError(f"trainer.accelerator={accelerator}, but no CUDA GPU is visible to PyTorch; run on a GPU "
                          "machine (check nvidia-smi and that torch is a CUDA build) or set trainer.accelerator=cpu")

    # ---- strategy
    if _get(cfg, "trainer.strategy") is not None:
        raise ConfigError(f"trainer.strategy={_get(cfg, 'trainer.strategy')!r} is not read: the strategy is a "
                          "config group; choose it with strategy=ddp (or fsdp, fsdp2, deepspeed_zero2, ...)")
    kind = strategy_kind(cfg.get("strategy"))
    pretty = {"fsdp": "FSDP", "model_parallel": "FSDP2 (ModelParallelStrategy)", "deepspeed": "DeepSpeed"}
    if kind in SHARDED_KINDS and not cuda:
        where = "trainer.accelerator=cpu" if accelerator == "cpu" else "no CUDA GPU is visible"
        raise ConfigError(f"strategy={kind}: {pretty[kind]} shards the model across CUDA GPUs, but {where}. On CPU "
                          "use strategy=ddp trainer.accelerator=cpu trainer.devices=N (several processes) or "
                          "strategy=auto; for FSDP/DeepSpeed run on GPUs with trainer.accelerator=gpu")
    if kind in ("fsdp", "model_parallel") and _get(cfg, "strategy.activation_checkpointing") \
            and _get(cfg, "engine.gradient_checkpointing"):
        raise ConfigError(f"strategy={kind} checkpoints the decoder layers itself (strategy.activation_checkpointing) "
                          "and engine.gradient_checkpointing=true would recompute them a second time: set "
                          "engine.gradient_checkpointing=false (or strategy.activation_checkpointing=false)")
    if kind == "deepspeed" and not _installed("deepspeed"):
        raise ConfigError("strategy=deepspeed_*: DeepSpeed is not installed. Install it with "
                          "pip install 'dpo-lightning[deepspeed]' (or pip install deepspeed) on the GPU machine, "
                          "or use strategy=fsdp")

    # ---- precision
    precision = str(_get(cfg, "trainer.precision", "32-true"))
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision}: use one of {', '.join(PRECISIONS[:1] + PRECISIONS[2:])}")
    if precision.startswith("bf16") and cuda and _cuda_available():
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ConfigError(f"trainer.precision={precision}: this GPU has no bfloat16 support (needs Ampere or "
                              "newer); use trainer.precision=16-mixed or 32-true")
    if precision == "16-mixed" and not cuda:
        raise ConfigError("trainer.precision=16-mixed needs a CUDA GPU (fp16 autocast); on the CPU use "
                          "trainer.precision=bf16-mixed or 32-true")

    # ---- quantization
    peft = _get(cfg, "peft")
    has_peft = bool(peft) and (peft.get("method", "lora") not in (None, "none"))
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
        if not _installed("bitsandbytes"):
            raise ConfigError(f"{where}: {bits}-bit quantization needs bitsandbytes: pip install 'bitsandbytes>=0.46' "
                              "(or quantization=none)")
        if not cuda and _version("bitsandbytes") < (0, 46):
            raise ConfigError(f"{where}: bitsandbytes {importlib.metadata.version('bitsandbytes')} has no CPU "
                              "kernels; upgrade to bitsandbytes>=0.46 or run on a GPU")
        if kind in SHARDED_KINDS:
            raise ConfigError(f"{where}: bitsandbytes {bits}-bit weights do not shard with strategy={kind}; use "
                              "strategy=ddp (every GPU holds the small quantized model) or quantization=none")
        compute = str((settings or {}).get("compute_dtype", (settings or {}).get("bnb_4bit_compute_dtype", "")))
        if compute.startswith("bf") and cuda and _cuda_available():
            import torch

            if not torch.cuda.is_bf16_supported():
                raise ConfigError(f"{where}.compute_dtype={compute}: this GPU has no bfloat16; use float16")
    if training and quantization_bits(_get(cfg, "model.quantization")) and not has_peft:
        bits = quantization_bits(_get(cfg, "model.quantization"))
        raise ConfigError(f"quantization: {bits}-bit weights cannot be fully fine-tuned; train LoRA adapters on top "
                          f"(peft=lora, i.e. QLoRA) or load full weights (quantization=none)")

    # ---- adapters and the reference
    if has_peft:
        from dpo_lightning.models.peft import lora_config

        try:
            lora_config(peft)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"peft: {err}") from None
    mode = _get(cfg, "reference.mode", "auto")
    if mode == "adapter" and not has_peft:
        raise ConfigError("reference.mode=adapter uses the policy with its LoRA adapters disabled, but there are "
                          "none: add peft=lora, or use reference.mode=auto/copy")
    if quantization_bits(_get(cfg, "reference.quantization")) and has_peft and mode in ("auto", "adapter") \
            and not _get(cfg, "reference.name_or_path"):
        raise ConfigError("reference.quantization applies to a separately loaded reference, but with peft=lora the "
                          "reference is the policy with adapters disabled; set reference.mode=copy (or model) to "
                          "load a quantized reference, or drop reference.quantization")

    # ---- TR-DPO and generation evaluation
    _validate_sync_and_generation(cfg, kind)


def _validate_sync_and_generation(cfg: DictConfig, kind: str) -> None:
    from dpo_lightning.evaluation.generation import GenerationSettings
    from dpo_lightning.reference.sync import sync_settings

    try:
        sync = sync_settings(_get(cfg, "reference.sync"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if sync and _get(cfg, "reference.precompute"):
        raise ConfigError("reference.sync (TR-DPO) moves the reference during training, but reference.precompute=true "
                          "reads its log-probs once from a cache: set reference.precompute=false, or "
                          "reference.sync.every_n_steps=0")
    if sync and kind == "deepspeed":
        raise ConfigError("reference.sync (TR-DPO) runs under strategy auto, ddp, fsdp and fsdp2, not DeepSpeed "
                          "(its partitioned parameters are not addressable in place); use strategy=fsdp")
    if sync and quantization_bits_of(cfg, "reference.quantization"):
        raise ConfigError("reference.sync mixes policy weights into the reference, which cannot be quantized: "
                          "drop reference.quantization")
    generation = _get(cfg, "generation")
    if generation:
        try:
            settings = GenerationSettings(**{k: v for k, v in generation.items() if k != "_target_"})
            if settings.num_prompts and settings.judge and ":" in str(settings.judge):
                from dpo_lightning.evaluation.judges import build_judge

                build_judge(settings.judge)  # a callable judge must import now, not at the first validation
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None


def quantization_bits_of(cfg: DictConfig, key: str) -> int:
    from dpo_lightning.models.quantization import quantization_bits

    return quantization_bits(_get(cfg, key))

