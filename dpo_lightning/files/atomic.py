"""Atomic file writes and atomic Lightning checkpoints (files and sharded folders).

Nothing is half-written: every file goes to a temporary name in the same folder and is renamed into
place (``os.replace``), so a crash leaves either the old file or the new one. Temporary files and folders
get the modes ``open`` and ``mkdir`` would (the umask honoured), not ``tempfile``'s private 0600 / 0700.

A write that fails (no space left, a read-only folder) removes its temporary file or folder, leaves the
previous file in place and raises ``WriteError``: "cannot write <target>: No space left on device (ENOSPC)".
"""

from __future__ import annotations

import contextlib
import errno as _errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class WriteError(OSError):
    """A file or folder could not be written; the previous one (if any) is untouched. ``path`` is the target
    (not the temporary name), ``errno`` / ``strerror`` the operating system's error."""

    def __init__(self, path: str | Path, err: OSError):
        super().__init__(err.errno, err.strerror or str(err))
        self.path = str(path)

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno) if self.errno is not None else None
        return f"cannot write {self.path}: {self.strerror}" + (f" ({name})" if name else "")

    def __reduce__(self):  # pickles (a DDP worker's error travels to the launcher)
        return (type(self), (self.path, OSError(self.errno, self.strerror)))


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` inside the block into ``WriteError(path)`` (one already naming a target passes as
    it is: the innermost write knows best which file failed)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(path, err) from err


def current_umask() -> int:
    """The process's umask, read without changing it where the OS says it (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(old)
    return old


def temp_file(folder: str | Path, prefix: str, suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` (created 0600, private) with the mode a plain ``open`` would give: 0666 less the
    umask, so a file renamed into place from it reads like any other (a teammate can read an export)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


def temp_dir(folder: str | Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` (created 0700) with the mode ``mkdir`` would give: 0777 less the umask."""
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=prefix))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def honour_umask(folder: str | Path) -> None:
    """Give every file and folder under ``folder`` (and itself) the umask's mode: libraries that write through
    their own temporary files (``save_pretrained``'s weights) leave them 0600."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file beside it; ``WriteError`` (old file kept) on failure."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file(path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes ``<file>.tmp`` and renames it over ``<file>``, and reads checkpoints
    with ``weights_only=True`` (tensors and plain containers only: a planted file cannot run code).

    A local file is written by ``torch.save`` straight to disk, tensor by tensor: Lightning's own
    ``TorchCheckpointIO`` first serializes the whole checkpoint (weights and optimizer state) into an in-memory
    buffer, a transient copy of all of it that sets the run's peak memory. Remote paths (``s3://``, ...) go
    through Lightning's (an fsspec transaction).
    """

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location,
                                       weights_only=True if weights_only is None else weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)  # fsspec's transaction
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported by {type(self).__name__} for local files")
        path = Path(str(path).removeprefix("file://"))
        tmp = path.with_name(f".{path.name}.tmp")
        with writing(path):  # a full disk: WriteError naming the checkpoint, the previous one untouched
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.save(checkpoint, tmp)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise


def remove_path(path: Path) -> None:
    """Delete a file or a folder (no error when absent)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_folder(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder ``tmp`` to ``out_dir``: an old ``out_dir`` (folder or file) is renamed aside
    first and deleted only once the new one is in place, so a crash leaves the old one (or its aside copy
    ``.<name>.old``), never nothing. When the last rename fails, the old one is put back before the error."""
    aside = out_dir.with_name(f".{out_dir.name}.old")
    remove_path(aside)
    moved = out_dir.exists() or out_dir.is_symlink()
    if moved:
        out_dir.rename(aside)
    try:
        tmp.rename(out_dir)
    except BaseException:
        if moved:
            aside.rename(out_dir)
        raise
    remove_path(aside)


if TYPE_CHECKING:  # a mixin for Lightning strategies: its super() calls and attributes are a Strategy's
    from lightning.pytorch.strategies import Strategy as _StrategyBase
else:
    _StrategyBase = object


class AtomicFolderSave(_StrategyBase):
    """Sharded checkpoints are folders (one file per rank): every rank writes into ``.<name>.tmp`` beside the
    target, then rank 0 renames it into place (the old checkpoint renamed aside first, ``replace_folder``),
    so a process killed mid-save leaves the previous checkpoint whole. Needs a filesystem all ranks share."""

    def _saves_folder(self) -> bool:
        return True

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any = None) -> None:
        if not self._saves_folder():
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp")
        if self.is_global_zero:
            remove_path(tmp)  # left by a save that was killed
        self.barrier("atomic_checkpoint_begin")
        try:
            with writing(path):  # a rank that fails stops the run (the others stop at the next collective)
                super().save_checkpoint(checkpoint, tmp, storage_options)
        except BaseException:
            remove_path(tmp)
            raise
        self.barrier("atomic_checkpoint_written")
        if self.is_global_zero:
            try:
                with writing(path):
                    replace_folder(tmp, path)
            except BaseException:
                remove_path(tmp)
                raise
        self.barrier("atomic_checkpoint_done")
