"""Preemption: SIGTERM (or SLURM's requeue signal) -> a checkpoint at the next optimizer step, on every rank, then exit.

    trainer = L.Trainer(callbacks=[PreemptionCheckpoint("run/checkpoints")], ...)
    trainer.fit(module, datamodule=dm)                 # killed with SIGTERM: saves run/checkpoints/last.ckpt,
                                                       # raises Preempted (exit status 128 + signal)
    trainer.fit(module, datamodule=dm, ckpt_path=latest_checkpoint("run"))   # resumes exactly

Lightning 2.6 already notices SIGTERM (``trainer.received_sigterm``) and, under ``SLURMEnvironment(auto_requeue=
True)``, saves ``hpc_ckpt_N.ckpt`` and requeues on SIGUSR1. Two parts of that do not hold for training we must
resume exactly: its SLURM handler saves from inside the signal handler, at whatever point of a step (or of a
gradient accumulation) the signal lands, with collectives in a signal handler; and its SIGTERM flag is read by
each rank on its own, so ranks signalled a step apart stop at different steps. This callback keeps Lightning's
contract (the same signals, ``scontrol requeue`` for the SLURM job, an exception derived from Lightning's
``SIGTERMException``) and changes only when: the handler just records the signal; after every optimizer step
the ranks agree with one all-reduce of that flag (a signal reaching any rank stops all of them), save one
checkpoint through ``trainer.save_checkpoint`` (atomic with ``AtomicCheckpointIO``), requeue on SLURM, and stop.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("dpo_lightning")


class Preempted(SIGTERMException):
    """Training stopped on a signal after saving ``path`` at ``step``; the exit status is 128 + the signal."""

    def __init__(self, signum: int, path: str, step: int):
        super().__init__(128 + int(signum))
        self.signum, self.path, self.step = int(signum), path, step


class PreemptionCheckpoint(L.Callback):
    """Save ``dirpath/filename`` and stop every rank at the next optimizer step after SIGTERM (and, when
    Lightning's ``SLURMEnvironment`` has ``auto_requeue``, its requeue signal, after which rank 0 runs
    ``scontrol requeue``). Costs one all-reduce of a flag per optimizer step under several processes."""

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.dirpath, self.filename = dirpath, filename
        self.received: int | None = None  # the signal this process received, if any
        self._requeue_signal: int | None = None
        self._previous: dict[int, Any] = {}  # signal.getsignal's handlers
        self._seen_step = -1

    # ---------------------------------------------------------------- signals
    def _handler(self, signum, frame) -> None:  # only records: no collective or I/O inside a signal handler
        self.received = self.received or int(signum)

    def on_train_start(self, trainer, pl_module) -> None:
        """Install the handlers (Lightning installs its own when fit starts, so this runs after it)."""
        if threading.current_thread() is not threading.main_thread():
            return
        env = trainer._accelerator_connector.cluster_environment
        signals = [signal.SIGTERM]
        if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
            self._requeue_signal = int(env.requeue_signal)
            signals.append(env.requeue_signal)
        for signum in signals:
            self._previous[int(signum)] = signal.getsignal(signum)
            signal.signal(signum, self._handler)
        self._seen_step = trainer.global_step

    def _restore(self) -> None:
        """Put back the handlers found at train start (Lightning's), before Lightning restores its originals."""
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    # ---------------------------------------------------------------- the stop
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._seen_step:  # inside a gradient accumulation: not a step boundary
            return
        self._seen_step = trainer.global_step
        mine = [float(self.received is not None and self.received != self._requeue_signal),
                float(self.received is not None and self.received == self._requeue_signal)]
        votes = trainer.strategy.reduce(torch.tensor(mine, device=pl_module.device), reduce_op="sum")
        if not votes.any():
            return
        requeue = bool(votes[1] > 0)
        signum = self._requeue_signal if requeue else int(signal.SIGTERM)
        assert signum is not None  # a requeue vote comes from a rank with the requeue signal
        path = str(Path(self.dirpath) / self.filename)
        trainer.save_checkpoint(path)  # every rank: sharded strategies write their shards, DDP's rank 0 the file
        if trainer.is_global_zero:
            name = signal.Signals(signum).name
            log.warning(f"{name}: saved {path} at step {trainer.global_step}; stopping on every rank. Resume with "
                        f"ckpt_path=last and the same run folder ({Path(self.dirpath).parent})")
            print(f"[dpo_lightning] {name}: checkpoint {path} (step {trainer.global_step}); resume with ckpt_path=last "
                  f"paths.output_dir={Path(self.dirpath).parent}", flush=True)
            if requeue:
                requeue_slurm_job()
        raise Preempted(signum, path, trainer.global_step)


def requeue_slurm_job() -> int:
    """``scontrol requeue`` this SLURM job (array task aware), as Lightning's SLURM handler does."""
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_id}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_id else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job_id):
        raise ValueError(f"unexpected SLURM job id {job_id!r}")
    result = subprocess.call(["scontrol", "requeue", job_id])
    (log.info if result == 0 else log.warning)(f"scontrol requeue {job_id}: exit status {result}")
    return result


# ---------------------------------------------------------------- ckpt_path=last
def is_complete(path: Path) -> bool:
    """A checkpoint that was fully written: a torch zip file whose central directory reads, or a non-empty
    sharded-checkpoint folder (written under a temporary name and renamed). Temporary names start with '.'."""
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return any(path.iterdir())
    try:
        with zipfile.ZipFile(path) as zf:
            return bool(zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """The checkpoints of a run folder (``checkpoints/*.ckpt`` and Lightning's SLURM ``hpc_ckpt_*.ckpt``),
    newest first; our temporary names (starting with '.') are not among them."""
    run_dir = Path(run_dir)
    found = [*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The newest complete checkpoint of a run folder (``checkpoints/*.ckpt`` and Lightning's SLURM
    ``hpc_ckpt_*.ckpt``), or None when it has none."""
    for path in checkpoint_candidates(run_dir):
        if is_complete(path):
            return str(path)
        log.warning(f"skipping incomplete checkpoint {path}")
    return None


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | Path) -> str | None:
    """``ckpt_path=last`` -> the newest complete checkpoint of ``run_dir`` (None, with a note, when there is
    none yet: a requeued job's first start). Any other value is returned unchanged. ``dpo-train`` uses
    ``callbacks.resume.resume_point``, which also reads each candidate (CRCs, structure) and what it holds."""
    if ckpt_path != "last":
        return ckpt_path
    found = latest_checkpoint(run_dir)
    what = f"resuming from {found}" if found else f"no checkpoint in {run_dir}, starting from the beginning"
    print(f"[dpo_lightning] ckpt_path=last: {what}", flush=True)
    return found
