"""One run per run folder: ``<run>/run.lock`` holds the pid and host of the ``dpo-train`` writing there.

    with RunLock(cfg.paths.output_dir):      # RunFolderBusy when a live run holds the folder
        train(...)

The lock is an ``flock`` on the file, held for the run's lifetime: the kernel drops it when the holder dies,
however it dies (SIGKILL, OOM killer, a lost node's NFS lease), so a lock file left by a dead process is taken
over (with a note naming the old holder) while a live holder's refuses the second run with its pid and host.
Only the launching process takes it: DDP ranks of one run (Lightning's launcher, torchrun, srun) share it, and
``rank_from_env()`` tells which process that is before any process group exists. Multirun jobs each write
their own folder, so each takes its own lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "run.lock"
# the rank variables launchers set (torchrun, SLURM's srun, Lightning's own launcher, MPI/JSM)
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK", "JSM_NAMESPACE_RANK")


class RunFolderBusy(RuntimeError):
    """Another live ``dpo-train`` holds the run folder."""


def rank_from_env() -> int:
    """0 for the process that takes the lock: every rank variable present is 0 (a single process has none)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value not in (None, "", "0"):
            try:
                return int(value)
            except ValueError:
                continue
    return 0


class RunLock:
    """``flock`` on ``<run_dir>/run.lock`` with the holder's pid, host and start time written into it."""

    def __init__(self, run_dir: str | Path, enabled: bool | None = None):
        self.path = Path(run_dir) / LOCK_NAME
        self.enabled = rank_from_env() == 0 if enabled is None else enabled
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if not self.enabled or self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise RunFolderBusy(
                    f"run folder {self.path.parent} is in use by dpo-train pid {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')} (since {holder.get('started', '?')}); wait for it to end, or use "
                    "another paths.output_dir") from None
            if _same_file(fd, self.path):  # not a file a releasing holder unlinked meanwhile
                break
            os.close(fd)
        old = _read(fd)
        if old.get("pid") is not None:
            print(f"[dpo_lightning] taking over {self.path}: its holder (pid {old.get('pid')} on host "
                  f"{old.get('host')}) is no longer running", flush=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: a waiting opener sees a new file, not this one
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)
