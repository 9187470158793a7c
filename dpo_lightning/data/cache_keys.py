"""Where the tokenization cache lives and what its entries are keyed by (``files/disk_cache.py`` does the
hashing, the lock concurrent misses take and the atomic publication, as for every cache of the package).

An entry's key hashes the cache format (``CACHE_VERSION``), the source (``source_fingerprint``: a local
file's or folder's bytes; otherwise its rows, ``records_fingerprint``), the tokenizer
(``tokenizer_fingerprint``) and the settings that change the rows (split, pairing, truncation, policies).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from dpo_lightning.files import disk_cache
from dpo_lightning.files.disk_cache import hash_file

CACHE_VERSION = "3"
_CALL_STATE = re.compile(r'"truncation":(null|\{[^{}]*\}),"padding":(null|\{[^{}]*\}),')


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about the tokenizer that changes token ids; for a processor, its tokenizer's and
    the processor's own settings (image processor, image tokens, chat template)."""
    from dpo_lightning.models.vision import is_processor

    if is_processor(tokenizer):
        h = hashlib.sha256(tokenizer_fingerprint(tokenizer.tokenizer).encode())
        try:
            h.update(tokenizer.to_json_string().encode())
        except (TypeError, ValueError, AttributeError):
            h.update(repr(type(tokenizer)).encode())
        h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
        return "processor:" + h.hexdigest()
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # without the call-time truncation/padding state that encoding sets and clears
        h.update(_CALL_STATE.sub("", backend.to_str(), count=1).encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token)).encode())
    return h.hexdigest()


def default_num_proc() -> int:
    """Every core this process may run on."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


def cache_root(cache_dir: str | Path | None) -> Path:
    """``data.cache_dir`` is the tokenization folder itself; without one, ``<DPO_LIGHTNING_CACHE>/tokenized``."""
    return disk_cache.cache_root(cache_dir, None if cache_dir else "tokenized")


def source_fingerprint(source: str | Path) -> str | None:
    """A hash of a local file's (or folder's) bytes; None for a hub id (hashed by its rows instead)."""
    if str(source).startswith("builtin:"):
        from dpo_lightning.data.formats import resolve_builtin

        path = resolve_builtin(source)
    else:
        path = Path(str(source)).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(path) if f != path else ''}|{f.stat().st_size}|".encode())
        hash_file(h, f)
    return h.hexdigest()


def records_fingerprint(records: list[dict[str, Any]]) -> str:
    """A hash of rows' content; images (``images``, already read as bytes) by the sha256 of their bytes, so the
    same image at another path is the same row and a changed image at the same path another."""
    from dpo_lightning.data.images import image_digest

    h = hashlib.sha256()
    for r in records:
        if isinstance(r, dict) and isinstance(r.get("images"), list):
            r = {**r, "images": [image_digest(b) for b in r["images"]]}
        h.update(json.dumps(r, sort_keys=True, default=str).encode() + b"\n")
    return h.hexdigest()


def cache_key(*parts: Any) -> str:
    return disk_cache.cache_key(*parts, version=CACHE_VERSION)
