"""Checks of where a run executes: the accelerator, the strategy and the precision."""

from __future__ import annotations

from omegaconf import DictConfig

from dpo_lightning.config import base
from dpo_lightning.config.base import ConfigError, _get

PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed")
PRETTY = {"fsdp": "FSDP", "model_parallel": "FSDP2 (ModelParallelStrategy)", "deepspeed": "DeepSpeed"}


def check_accelerator(cfg: DictConfig) -> None:
    """``trainer.accelerator=gpu`` needs a GPU that PyTorch sees."""
    accelerator = base.accelerator(cfg)
    if accelerator in ("gpu", "cuda") and not base.cuda_available():
        raise ConfigError(f"trainer.accelerator={accelerator}, but no CUDA GPU is visible to PyTorch; run on a GPU "
                          "machine (check nvidia-smi and that torch is a CUDA build) or set trainer.accelerator=cpu")


def check_strategy(cfg: DictConfig) -> str:
    """The strategy group against the hardware and the engine; returns the strategy's kind (``strategy_kind``)."""
    from dpo_lightning.training.strategies import SHARDED_KINDS, strategy_kind

    if _get(cfg, "trainer.strategy") is not None:
        raise ConfigError(f"trainer.strategy={_get(cfg, 'trainer.strategy')!r} is not read: the strategy is a "
                          "config group; choose it with strategy=ddp (or fsdp, fsdp2, deepspeed_zero2, ...)")
    kind = strategy_kind(cfg.get("strategy"))
    if kind in SHARDED_KINDS and not base.uses_cuda(cfg):
        where = "trainer.accelerator=cpu" if base.accelerator(cfg) == "cpu" else "no CUDA GPU is visible"
        raise ConfigError(f"strategy={kind}: {PRETTY[kind]} shards the model across CUDA GPUs, but {where}. On CPU "
                          "use strategy=ddp trainer.accelerator=cpu trainer.devices=N (several processes) or "
                          "strategy=auto; for FSDP/DeepSpeed run on GPUs with trainer.accelerator=gpu")
    if kind in ("fsdp", "model_parallel") and _get(cfg, "strategy.activation_checkpointing") \
            and _get(cfg, "engine.gradient_checkpointing"):
        raise ConfigError(f"strategy={kind} checkpoints the decoder layers itself (strategy.activation_checkpointing) "
                          "and engine.gradient_checkpointing=true would recompute them a second time: set "
                          "engine.gradient_checkpointing=false (or strategy.activation_checkpointing=false)")
    if kind == "deepspeed" and not base.installed("deepspeed"):
        raise ConfigError("strategy=deepspeed_*: DeepSpeed is not installed. Install it with "
                          "pip install 'dpo-lightning[deepspeed]' (or pip install deepspeed) on the GPU machine, "
                          "or use strategy=fsdp")
    return kind


def check_precision(cfg: DictConfig) -> None:
    """``trainer.precision`` is one we support, and the hardware has its number format."""
    cuda = base.uses_cuda(cfg)
    precision = str(_get(cfg, "trainer.precision", "32-true"))
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision}: use one of {', '.join(PRECISIONS[:1] + PRECISIONS[2:])}")
    if precision.startswith("bf16") and cuda and base.cuda_available() and not base.bf16_supported():
        raise ConfigError(f"trainer.precision={precision}: this GPU has no bfloat16 support (needs Ampere or "
                          "newer); use trainer.precision=16-mixed or 32-true")
    if precision == "16-mixed" and not cuda:
        raise ConfigError("trainer.precision=16-mixed needs a CUDA GPU (fp16 autocast); on the CPU use "
                          "trainer.precision=bf16-mixed or 32-true")
