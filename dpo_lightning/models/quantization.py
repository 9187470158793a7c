"""bitsandbytes settings: the ``quantization`` config group (``model.quantization``) -> ``BitsAndBytesConfig``.

    quantization=bnb_4bit   load the policy's linear layers in 4 bit (NF4/FP4, optional double quantization)
    quantization=bnb_8bit   load them in 8 bit (LLM.int8())
    quantization=none       full-precision weights (default)

A mapping with ``bits: 4`` or ``bits: 8`` (or transformers' own ``load_in_4bit`` / ``load_in_8bit`` keys) is
accepted; 4-bit or 8-bit weights are frozen, so training them needs adapters (``peft=lora``: QLoRA), which
``config/`` checks before any model loads. bitsandbytes >= 0.46 also runs on the CPU (slowly).

On a CPU with AVX512-BF16, bitsandbytes (0.49+) repacks a 4-bit layer's weight into a CPU-only layout the first
time the layer runs in eval mode without gradients (``Linear4bit.support_avx512bf16_for_cpu``, set from the CPU at
construction, decides it). ``keep_off_cpu_packed_path`` turns that off for every layer of the models we load:
the packed layout only serves out_features % 32 == 0 (others stop with "N must be divisible by block_n"), its
kernel computes in bfloat16 whatever the compute dtype, it has no autograd formula (a training pass after a
validation pass loses the gradient through the frozen weight), ``state_dict()`` unpacks it again with a lossy
inverse (the frozen base changes), and converting costs about as much as a one-token pass per layer.
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


# The attribute bitsandbytes' ``Linear4bit.forward`` reads to choose its CPU packed (AVX512-BF16) layout.
CPU_PACKED_FLAG = "support_avx512bf16_for_cpu"


def keep_off_cpu_packed_path(model: torch.nn.Module) -> int:
    """Keep every bitsandbytes 4-bit linear layer of ``model`` on the plain (unpacked) path; returns how many
    layers had the packed path switched on (0 on CPUs without AVX512-BF16 or bitsandbytes without the path).

    Why all layers, not only those with shapes the packed layout cannot hold (out_features % 32 != 0 or an odd
    in_features): (1) the packed kernel computes in bfloat16 whatever ``compute_dtype`` says, so validation and
    reference log-probs would differ from the training pass's; (2) it has no autograd formula, and a layer once
    packed stays packed, so a QLoRA training step after a validation pass would drop the gradient through the
    frozen weight (earlier adapters train on a wrong gradient); (3) ``state_dict()`` (checkpoints, exports,
    reference snapshots) unpacks the live weight with an inverse that does not restore the scales exactly (they
    went through bf16; without double quantization they stay transposed bf16), so one validation pass and one
    checkpoint change the frozen base (measured on a 256x704 NF4 layer: outputs move by 3.6% of their range,
    0.1% with double quantization), and the next eval pass packs again; (4) converting costs about what it
    saves: measured for a 2048x5632 NF4 layer, packing 82 ms and packing + unpacking 215 ms against a 120 ms
    no-grad one-token pass on the plain path (4096x11008: 0.75 s / 2.1 s against 0.45 s).
    A layer already packed is unpacked with bitsandbytes' inverse (see (3)). Idempotent; safe on meta tensors.
    """
    changed = 0
    for module in model.modules():
        if not hasattr(module, CPU_PACKED_FLAG):
            continue
        if getattr(module, CPU_PACKED_FLAG):
            changed += 1
        setattr(module, CPU_PACKED_FLAG, False)
        weight: Any = getattr(module, "weight", None)  # a bitsandbytes Params4bit
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return changed
