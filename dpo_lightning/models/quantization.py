"""bitsandbytes settings: the ``quantization`` config group (``model.quantization``) -> ``BitsAndBytesConfig``.

    quantization=bnb_4bit   load the policy's linear layers in 4 bit (NF4/FP4, optional double quantization)
    quantization=bnb_8bit   load them in 8 bit (LLM.int8())
    quantization=none       full-precision weights (default)

A mapping with ``bits: 4`` or ``bits: 8`` (or transformers' own ``load_in_4bit`` / ``load_in_8bit`` keys) is
accepted; 4-bit or 8-bit weights are frozen, so training them needs adapters (``peft=lora``: QLoRA), which
``validation.py`` checks before any model loads. bitsandbytes >= 0.46 also runs on the CPU (slowly).
"""

from __future__ import annotations

from typing import Any

import torch

from dpo_lightning.models.dtypes import resolve_dtype

QUANT_TYPES = ("nf4", "fp4")
# Our short keys -> BitsAndBytesConfig arguments.
_ALIASES = {
    "quant_type": "bnb_4bit_quant_type",
    "double_quant": "bnb_4bit_use_double_quant",
    "compute_dtype": "bnb_4bit_compute_dtype",
    "quant_storage": "bnb_4bit_quant_storage",
    "skip_modules": "llm_int8_skip_modules",
    "threshold": "llm_int8_threshold",
}


def quantization_bits(settings: dict[str, Any] | None) -> int | None:
    """4, 8, or None (no quantization) for a ``quantization`` mapping."""
    if not settings:
        return None
    settings = dict(settings)
    bits = settings.get("bits")
    if bits is None:
        bits = 4 if settings.get("load_in_4bit") else 8 if settings.get("load_in_8bit") else None
    if bits is None:
        return None
    if int(bits) not in (4, 8):
        raise ValueError(f"quantization.bits={bits!r}: bitsandbytes supports 4 or 8")
    return int(bits)


def bnb_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """``BitsAndBytesConfig`` keyword arguments for our mapping (validated, dtypes resolved)."""
    settings = {k: v for k, v in dict(settings).items() if v is not None}
    bits = quantization_bits(settings)
    if bits is None:
        raise ValueError("quantization settings name no bit width: set bits: 4 or bits: 8 (or quantization=none)")
    out: dict[str, Any] = {"load_in_4bit": bits == 4, "load_in_8bit": bits == 8}
    for key, value in settings.items():
        if key in ("bits", "load_in_4bit", "load_in_8bit"):
            continue
        out[_ALIASES.get(key, key)] = value
    if bits == 4:
        qt = out.setdefault("bnb_4bit_quant_type", "nf4")
        if qt not in QUANT_TYPES:
            raise ValueError(f"quantization.quant_type={qt!r}: use one of {QUANT_TYPES}")
        for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            if key in out:
                out[key] = resolve_dtype(out[key]) or torch.float32
    else:
        four_bit_only = [k for k in out if k.startswith("bnb_4bit_")]
        if four_bit_only:
            raise ValueError(f"quantization: {four_bit_only} only apply to 4-bit (bits: 4)")
    return out


def bnb_config(settings: dict[str, Any] | None):
    """A ``transformers.BitsAndBytesConfig`` for ``settings``, or None when it asks for no quantization."""
    if quantization_bits(settings) is None:
        return None
    from transformers import BitsAndBytesConfig

    assert settings is not None  # quantization_bits(None) is None
    return BitsAndBytesConfig(**bnb_kwargs(settings))


def is_quantized(model: torch.nn.Module) -> bool:
    """True when the model was loaded with bitsandbytes 4-bit or 8-bit weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]  # PEFT
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                or getattr(base, "is_quantized", False))
