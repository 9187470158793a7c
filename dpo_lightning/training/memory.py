"""Handing memory back to the operating system between the phases of a run (docs/performance.md, "Memory").

Python frees objects into its own pools and glibc's ``free`` keeps freed heap pages for reuse, so what setup
allocated and dropped (records, the tokenizer, JSON of the tokenization cache, load-time buffers) would stay
in the process's resident memory for the whole run and add to the training peak. ``release_free_memory``
collects garbage and asks glibc to return its free pages (``malloc_trim``); elsewhere it only collects.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Collect garbage, then return free heap pages to the OS where the C library can; True if it could."""
    gc.collect()
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
