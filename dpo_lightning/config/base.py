"""What every check of a composed config shares: ``ConfigError``, reading a key, the environment probes.

The probes (``installed``, ``cuda_available``, ...) are looked up through this module by the checks, so a test
can patch them here once (``monkeypatch.setattr(base, "cuda_available", ...)``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """An invalid combination of settings, reported before any model loads."""


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    """The value at dotted ``key`` (plain containers for nodes, interpolations resolved), or ``default``."""
    value = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def has_peft(cfg: DictConfig) -> bool:
    """Whether the policy trains adapters (``peft=lora``; ``peft=none`` or ``method: none``: no)."""
    peft = _get(cfg, "peft")
    return bool(peft) and peft.get("method", "lora") not in (None, "none")


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def package_version(name: str) -> tuple[int, ...]:
    """(major, minor) of an installed distribution; () when it is not installed."""
    try:
        parts = importlib.metadata.version(name).split(".")[:2]
        return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)
    except importlib.metadata.PackageNotFoundError:
        return ()


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def accelerator(cfg: DictConfig) -> str:
    return str(_get(cfg, "trainer.accelerator", "auto")).lower()


def uses_cuda(cfg: DictConfig) -> bool:
    """Whether the run will be on CUDA GPUs (``trainer.accelerator`` gpu/cuda, or auto with a GPU visible)."""
    acc = accelerator(cfg)
    if acc in ("gpu", "cuda"):
        return True
    return acc == "auto" and cuda_available()


def bf16_supported() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()
