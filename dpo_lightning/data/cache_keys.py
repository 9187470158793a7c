"""Where the tokenization cache lives, what its entries are keyed by, and the lock concurrent misses take.

An entry's key hashes the cache format (``CACHE_VERSION``), the source (``source_fingerprint``: a local
file's or folder's bytes; otherwise its rows, ``records_fingerprint``), the tokenizer
(``tokenizer_fingerprint``) and the settings that change the rows (split, pairing, truncation, policies).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

CACHE_VERSION = "3"
_CALL_STATE = re.compile(r'"truncation":(null|\{[^{}]*\}),"padding":(null|\{[^{}]*\}),')


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about the tokenizer that changes token ids."""
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
    return Path(cache_dir) if cache_dir else Path(os.environ.get(
        "DPO_LIGHTNING_CACHE", Path.home() / ".cache" / "dpo_lightning")) / "tokenized"


def source_fingerprint(source: str | Path) -> str | None:
    """A hash of a local file's (or folder's) bytes; None for a hub id (hashed by its rows instead)."""
    if str(source).startswith("builtin:"):
        from importlib import resources

        path = Path(str(resources.files("dpo_lightning.assets").joinpath(f"{str(source).split(':', 1)[1]}.jsonl")))
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


def hash_file(h, path: Path) -> None:
    """Feed a file's bytes to the hash ``h`` in 16 MiB blocks."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)


def records_fingerprint(records: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, default=str).encode() + b"\n")
    return h.hexdigest()


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:20]


@contextlib.contextmanager
def locked(root: Path):
    """An exclusive lock on the cache folder (POSIX; elsewhere concurrent misses both write, atomically)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
