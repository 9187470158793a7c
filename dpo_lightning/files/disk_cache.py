"""The one disk-cache utility behind every cache of the package (tokenized rows, reference log-probs, the
built-in tiny model): where the cache lives, how an entry is named, the lock concurrent misses take, and the
atomic publication of an entry.

    root = cache_root(cfg.paths.cache_dir, "reference")          # <cache_dir or $DPO_LIGHTNING_CACHE>/reference
    key = cache_key("fingerprint", {"max_length": 512}, version="2")  # sha256 of the JSON of the parts, cut short
    with file_lock(root / key, waiting="another process builds it; waiting"):   # <root>/<key>.lock
        if not hit(root / key):
            publish_file(root / key, write)                       # temp file + os.replace
            # or: tmp = staging_folder(root / key); ...; publish_folder(tmp, root / key, complete=...)

Misses are built under ``file_lock`` (the ``filelock`` package: fcntl/msvcrt, released if the holder dies), so
parallel processes (the ranks of a node, sweep jobs, SLURM arrays on a shared filesystem) build an entry once:
one builds, the others wait, then read it. Entries appear whole or not at all (a temp name beside the entry,
then a rename), so a reader never needs the lock. The lock file stays beside the entry (deleting it would race).

It imports only ``files.atomic`` (the umask-honouring temp files): every layer may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dpo_lightning.files.atomic import honour_umask, temp_dir, temp_file, writing

ENV = "DPO_LIGHTNING_CACHE"  # overrides the default root ~/.cache/dpo_lightning


def default_root() -> Path:
    """``$DPO_LIGHTNING_CACHE``, else ``~/.cache/dpo_lightning``."""
    return Path(os.environ.get(ENV, Path.home() / ".cache" / "dpo_lightning"))


def cache_root(cache_dir: str | Path | None = None, kind: str | None = None) -> Path:
    """``cache_dir`` (``paths.cache_dir``) or ``default_root()``, then the ``kind`` subfolder when given."""
    base = Path(cache_dir) if cache_dir else default_root()
    return base / kind if kind else base


def cache_key(*parts: Any, version: str, length: int = 20) -> str:
    """The first ``length`` hex digits of the sha256 of ``[version, *parts]`` as sorted-key JSON (values JSON
    cannot write are written as ``str``): equal parts, equal key; any part changed, another key."""
    text = json.dumps([version, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def hash_file(h, path: Path) -> None:
    """Feed a file's bytes to the hash ``h`` in 16 MiB blocks."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)


@contextlib.contextmanager
def file_lock(entry: str | Path, *, waiting: str | None = None, poll: float = 0.5) -> Iterator[None]:
    """Hold the exclusive lock ``<entry>.lock`` (created with its folder); prints ``waiting`` when another
    process holds it and this one has to wait."""
    from filelock import FileLock, Timeout

    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{entry}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting:
            print(waiting, flush=True)
        lock.acquire(poll_interval=poll)
    try:
        yield
    finally:
        lock.release()


def publish_file(path: str | Path, write: Callable[[str], None], *, suffix: str = "") -> Path:
    """Write an entry file atomically: ``write(tmp)`` fills a temp file beside ``path`` (``.tmp-*<suffix>``),
    which is then renamed over ``path``; on any error the temp file is removed and ``path`` is untouched (an
    ``OSError``, a full disk: ``WriteError`` naming ``path``). Readers only ever see ``path``, never ``.tmp-*``."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file(path.parent, prefix=".tmp-", suffix=suffix)  # the umask's mode, not 0600
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def staging_folder(entry: str | Path) -> Path:
    """A new empty temp folder beside ``entry`` (``.tmp-*``) to build an entry folder in."""
    entry = Path(entry)
    with writing(entry):
        entry.parent.mkdir(parents=True, exist_ok=True)
        return temp_dir(entry.parent, prefix=".tmp-")  # the umask's mode: a shared cache stays shared


def publish_folder(tmp: Path, entry: Path, *, complete: Callable[[Path], bool]) -> Path:
    """Rename the finished folder ``tmp`` to ``entry`` (atomic). When another process published the same entry
    first (``complete(entry)``: the same content), keep theirs and remove ``tmp``; otherwise the error stands.
    Files that libraries wrote privately (``save_pretrained``'s 0600 weights) get the umask's mode first.
    A failure (``WriteError`` naming ``entry``) leaves no entry: the caller removes ``tmp``."""
    with writing(entry):
        honour_umask(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not complete(entry):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return entry
