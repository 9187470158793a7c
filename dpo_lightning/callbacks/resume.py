"""Resuming a run: the checkpoint to start from (a damaged newest one skipped), what it holds besides the
training state, and the logger arguments that continue the logs the interrupted run was writing.

    point = resume_point(cfg.ckpt_path, cfg.paths.output_dir)     # None: a fresh start
    loggers = [instantiate(c, **logger_resume_kwargs(c, point)) for c in cfg.logger.values()]
    callbacks.append(RunState())          # the W&B run id and the "before" validation, in every checkpoint
    trainer.fit(module, datamodule=dm, ckpt_path=point and point.path)

What a resumed run (same ``paths.output_dir``) continues, from the checkpoint's step on:
- CSV (``ContinuingCSVLogger``): ``metrics.csv`` keeps the rows logged before the resume step, the resumed run
  appends (Lightning's ``CSVLogger`` deletes the file; one that merely kept it stops on the old header:
  "dict contains fields not in fieldnames").
- TensorBoard: ``purge_step``: TensorBoard drops the interrupted run's events from the resume step on.
- W&B: the run id stored in the checkpoint with ``resume="allow"``: online the same run continues; offline a
  second ``offline-run-*-<id>`` folder with the same id, and ``wandb sync`` of both uploads one run.
- the training curves (``TrainingCurves`` keeps its history in the checkpoint).
The "before" validation is not run again: its numbers travel in the checkpoint (``RunState``).
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from dpo_lightning.callbacks.preemption import checkpoint_candidates

log = logging.getLogger("dpo_lightning")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated, damaged); the message says which and why."""


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run starts: the checkpoint, its optimizer step, the first step the resumed run logs
    (rows an interrupted run logged from there on are redone), the W&B run id and the "before" validation."""

    path: str
    global_step: int | None = None
    log_step: int | None = None
    wandb_id: str | None = None
    before: dict[str, float] = field(default_factory=dict)


def read_resume_point(path: str | Path) -> ResumePoint:
    """Check that the checkpoint reads (zip directory, every member's CRC, the pickled structure) and read
    what a resume needs; raises ``CheckpointError`` with the reason. Tensors are memory-mapped, not loaded."""
    path = Path(path)
    try:
        if path.is_dir():  # a sharded checkpoint folder (renamed into place when complete)
            if not any(path.iterdir()):
                raise CheckpointError(f"checkpoint folder {path} is empty")
            meta = path / "meta.pt"  # Lightning's FSDP folder: the loops' state lives here
            ckpt = torch.load(meta, map_location="cpu", weights_only=True) if meta.is_file() else {}
        else:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()  # reads every member: a damaged byte anywhere fails its CRC
            if bad is not None:
                raise CheckpointError(f"checkpoint {path} is damaged ({bad} fails its CRC check)")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as err:  # BadZipFile (truncated), UnpicklingError, RuntimeError from torch's reader, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {reason})") from None
    stepped = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {}).get("_batches_that_stepped")
    state = ckpt.get("callbacks", {}).get(RunState.__qualname__, {})
    # Lightning logs with `_batches_that_stepped`, which a checkpoint holds before the step's increment: the
    # resumed loop logs from the next value on (the steps' own rows up to the checkpoint were written before it)
    return ResumePoint(str(path), ckpt.get("global_step"), None if stepped is None else int(stepped) + 1,
                       state.get("wandb_id"), dict(state.get("before") or {}))


def resume_point(ckpt_path: str | None, run_dir: str | Path) -> ResumePoint | None:
    """``ckpt_path=last``: the newest readable checkpoint of ``run_dir`` (an unreadable newer one is skipped,
    with a warning; None when the folder has none yet: a requeued job's first start). An explicit path must
    read (``CheckpointError`` otherwise; ``FileNotFoundError`` when absent). None/empty: a fresh start."""
    if not ckpt_path:
        return None
    if ckpt_path != "last":
        if "://" in str(ckpt_path) and not str(ckpt_path).startswith("file://"):
            return ResumePoint(str(ckpt_path))  # remote: Lightning's reader checks it
        local = Path(str(ckpt_path).removeprefix("file://"))
        if not local.exists():
            raise FileNotFoundError(f"ckpt_path {ckpt_path} does not exist")
        return read_resume_point(local)
    skipped = []
    for path in checkpoint_candidates(run_dir):
        if path.name.startswith("."):  # our temporary names: a save in progress or killed
            continue
        try:
            point = read_resume_point(path)
        except CheckpointError as err:
            log.warning(f"ckpt_path=last: skipping {err}")
            skipped.append(path.name)
            continue
        note = f" (newest readable; skipped unreadable {', '.join(skipped)})" if skipped else ""
        print(f"[dpo_lightning] ckpt_path=last: resuming from {path}{note}", flush=True)
        return point
    if skipped:
        raise CheckpointError(f"ckpt_path=last: no readable checkpoint in {run_dir} (unreadable: "
                              f"{', '.join(skipped)}); move them away to start from the beginning")
    print(f"[dpo_lightning] ckpt_path=last: no checkpoint in {run_dir}, starting from the beginning", flush=True)
    return None


def logger_resume_kwargs(logger_cfg: Any, point: ResumePoint | None) -> dict[str, Any]:
    """Extra constructor arguments that make a logger continue the interrupted run's logs (see the module
    docstring); ``{}`` for a fresh start or a logger with nothing to continue."""
    if point is None or not logger_cfg:
        return {}
    target = str(logger_cfg.get("_target_", "")).rsplit(".", 1)[-1]
    if target == "ContinuingCSVLogger" and point.log_step is not None:
        return {"resume_step": point.log_step}
    if target == "TensorBoardLogger" and point.log_step is not None:
        return {"purge_step": point.log_step}  # SummaryWriter: hides events at steps >= purge_step written before
    if target == "WandbLogger" and point.wandb_id and not (logger_cfg.get("id") or logger_cfg.get("version")):
        return {"id": point.wandb_id}  # Lightning's WandbLogger passes resume="allow"
    return {}


class RunState(L.Callback):
    """Keeps in every checkpoint what a resumed run needs besides the training state: the W&B run id (so the
    logs continue that run) and the held-out metrics of the validation before training (not run again)."""

    def __init__(self) -> None:
        self.before: dict[str, float] | None = None
        self.wandb_id: str | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.before is None and trainer.state.fn == "validate" and trainer.global_step == 0:
            self.before = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def setup(self, trainer, pl_module, stage: str) -> None:
        for lg in trainer.loggers:  # rank 0 has started the W&B run by now (hyperparameters are logged)
            if type(lg).__name__ == "WandbLogger" and lg.version:
                self.wandb_id = str(lg.version)

    def state_dict(self) -> dict[str, Any]:
        return {"wandb_id": self.wandb_id, "before": dict(self.before or {})}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wandb_id = state_dict.get("wandb_id") or self.wandb_id
        self.before = dict(state_dict.get("before") or {}) or self.before
