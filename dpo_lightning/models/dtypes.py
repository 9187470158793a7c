"""Config dtype strings (``bf16``, ``float32``, ...) -> torch dtypes, shared by model loading and quantization.

Its own module so that ``hf.py`` (loading) and ``quantization.py`` (bitsandbytes settings) both import it
without importing each other.
"""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map a config string (``bf16``, ``float32``, ...) to a torch dtype; ``None``/``auto`` stay ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) == "auto":
        return None
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)} or 'auto'") from None
