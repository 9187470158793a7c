"""A run killed with SIGKILL mid-epoch after a validation, then resumed from `checkpoints/last.ckpt` in the same
run folder, ends with the weights of a run never interrupted and with one continuous record of its metrics, for
every logger the project ships: the CSV file, TensorBoard's events, W&B offline (the same run id), and with
`logger=none` the training curves. The resumed run does not repeat the "before" validation.

Before the fix: Lightning's CSVLogger deleted the interrupted run's metrics.csv (a writer that kept it stopped
on "dict contains fields not in fieldnames"), TensorBoard showed the killed run's steps twice, W&B started a
new run id, the curves started at the resume step, and the "before" validation ran again."""

from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TIMEOUT = 240
KILL_AT = 15  # after the validation and the checkpoint of step 12: steps 13-15 are redone by the resumed run
COMMON = ["print_config=false", "trainer.accelerator=cpu", "trainer.max_steps=24", "trainer.val_check_interval=12",
          "+callbacks.model_checkpoint.every_n_train_steps=6", "trainer.log_every_n_steps=1", "data.batch_size=8",
          "data.max_length=32", "generation.num_prompts=0", "callbacks.progress_bar=null", "export=true",
          "trainer.enable_model_summary=false", "seed=5"]
# every shipped logger at once (one run writes all three records), and none; every row/event is flushed at once,
# so the killed run's rows after the checkpoint are on disk for the resumed run to drop
LOGGERS = {
    "csv+tensorboard+wandb": ["logger=[csv,tensorboard,wandb]", "+logger.csv.flush_logs_every_n_steps=1",
                              "+logger.tensorboard.max_queue=1", "logger.wandb.offline=true"],
    "none": ["logger=none"],
}
DETERMINISTIC = ("train/loss", "train/rewards/accuracies", "train/logps/chosen", "val/loss",
                 "val/rewards/accuracies")

KILLER = '''
import os, signal
import lightning as L

class KillAt(L.Callback):
    """SIGKILL this process (no handler runs, nothing is flushed) at the end of optimizer step `step`."""
    def __init__(self, step):
        self.step = int(step)
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

class ReportValidations(L.Callback):
    """Print a line for every validation: which Trainer entry point ran it, at which step."""
    def on_validation_end(self, trainer, pl_module):
        print(f"[validation] {getattr(trainer.state.fn, 'value', trainer.state.fn)} at step {trainer.global_step}", flush=True)
'''


def _env(tmp_path: Path) -> dict:
    (tmp_path / "cb").mkdir(exist_ok=True)
    (tmp_path / "cb" / "killer_cb.py").write_text(KILLER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "HOME": str(tmp_path), "PYTHONPATH": os.pathsep.join([str(tmp_path / "cb"), env.get("PYTHONPATH", "")])}


def _train(args: list[str], env: dict, cwd: Path, expect: int = 0) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run([sys.executable, "-m", "dpo_lightning.train", *COMMON, *args], capture_output=True,
                             text=True, timeout=TIMEOUT, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"training did not finish in {TIMEOUT}s:\n{(err.stderr or b'')[-3000:]}")
    assert res.returncode == expect, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "export" / "model.safetensors"))


# ---------------------------------------------------------------- readers: metric -> [(step, value)] in log order
def _accuracy_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("held-out reward accuracy: before "))


def csv_series(run: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    with open(run / "csv" / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            for key in DETERMINISTIC:
                if row.get(key):
                    out.setdefault(key, []).append((int(row["step"]), float(row[key])))
    return out


def tensorboard_series(run: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})  # honours purge_step
    acc.Reload()
    return {k: [(e.step, e.value) for e in acc.Scalars(k)] for k in DETERMINISTIC if k in acc.Tags()["scalars"]}


def wandb_records(path: Path):
    """The records of a W&B transaction log (`run-<id>.wandb`: LevelDB's log format of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunk = path.read_bytes(), 7, 32768, b""  # 7: the ":W&B" file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record
        elif kind == 0:
            break


def wandb_series(run: Path) -> tuple[list[str], list[dict[str, list]]]:
    """(run ids, one series per offline-run folder in start order)."""
    ids, series = [], []
    for folder in sorted((run / "wandb").glob("offline-run-*")):
        out: dict[str, list] = {}
        for rec in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.append(rec.run.run_id)
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                for key in DETERMINISTIC:
                    if key in row:
                        out.setdefault(key, []).append((int(row["trainer/global_step"]), float(row[key])))
        series.append(out)
    return ids, series


def curves_series(run: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    for line in (run / "training_curves.csv").read_text().splitlines()[1:]:
        key, step, value = line.split(",")
        out.setdefault(key, []).append((int(step), float(value)))
    return out


@pytest.mark.subprocess
@pytest.mark.parametrize("loggers", ["csv+tensorboard+wandb", pytest.param("none", marks=pytest.mark.slow)])
def test_sigkill_then_resume_continues_the_logs(tmp_path, loggers):
    env, args = _env(tmp_path), LOGGERS[loggers]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    first = _train([*args, f"paths.output_dir={straight}"], env, tmp_path)
    _train([*args, f"paths.output_dir={broken}", "+callbacks.kill._target_=killer_cb.KillAt",
            f"+callbacks.kill.step={KILL_AT}"], env, tmp_path, expect=-signal.SIGKILL)
    ckpt = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 12 and ckpt["epoch"] == 0  # mid-epoch, after the validation of step 12
    assert (broken / "run.lock").exists()  # SIGKILL: the lock file stays; the next run takes it over

    res = _train([*args, f"paths.output_dir={broken}", f"ckpt_path={broken}/checkpoints/last.ckpt",
                  "+callbacks.report._target_=killer_cb.ReportValidations"], env, tmp_path)
    assert "taking over" in res.stdout and "Traceback" not in res.stderr
    # the "before" validation is not run again; the summary reports the one the checkpoint holds
    assert [line for line in res.stdout.splitlines() if line.startswith("[validation]")] == \
        ["[validation] fit at step 24", "[validation] validate at step 24"]
    assert _accuracy_line(res.stdout) == _accuracy_line(first.stdout)
    a, b = _weights(straight), _weights(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert curves_series(broken) == curves_series(straight)  # training_curves.csv: whatever the logger
    if loggers == "none":
        return
    assert csv_series(broken) == csv_series(straight)
    assert tensorboard_series(broken) == tensorboard_series(straight)
    (sid,), (s,) = wandb_series(straight)
    ids, (killed, resumed) = wandb_series(broken)
    assert ids[0] == ids[1] != sid  # the resumed run continues the killed run's id
    assert ckpt["callbacks"]["RunState"]["wandb_id"] == ids[0]
    # the resumed run logs the uninterrupted run's rows from the checkpoint's step on, nothing before it again;
    # the killed run's file holds a prefix of the rows before it (W&B writes its log in 32 KB blocks: a SIGKILL
    # loses the unwritten block, a SIGTERM or a normal end does not)
    for k, points in s.items():
        assert resumed.get(k, []) == [p for p in points if p[0] >= 12], k
        before = [p for p in killed.get(k, []) if p[0] < 12]
        assert before == points[:len(before)], k


def test_csv_logger_keeps_the_rows_before_the_resume_step_and_appends(tmp_path):
    """Unit level: the interrupted run's metrics.csv (rows at steps 0-14), resumed at step 12 with a metric the
    file has no column for yet: rows 0-11 stay, 12-14 go, the new rows follow under the widened header."""
    from dpo_lightning.callbacks.logs import ContinuingCSVLogger

    first = ContinuingCSVLogger(str(tmp_path), name="csv", version="", flush_logs_every_n_steps=1)
    for step in range(15):
        first.log_metrics({"train/loss": step / 10, **({"val/loss": 1.0} if step == 11 else {})}, step=step)
    first.save()
    resumed = ContinuingCSVLogger(str(tmp_path), name="csv", version="", resume_step=12)
    for step in range(12, 16):
        resumed.log_metrics({"train/loss": step / 10, "train/new": 1.0}, step=step)
    resumed.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(16))
    assert [float(r["train/loss"]) for r in rows] == [s / 10 for s in range(16)]
    assert rows[11]["val/loss"] == "1.0" and rows[11]["train/new"] == "" and rows[15]["train/new"] == "1.0"
    fresh = ContinuingCSVLogger(str(tmp_path), name="csv", version="")  # no resume: Lightning's (a new file)
    fresh.log_metrics({"train/loss": 0.5}, step=0)
    fresh.save()
    assert (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[1:] == ["0,0.5"]


def test_logger_resume_kwargs():
    from omegaconf import OmegaConf

    from dpo_lightning.callbacks.resume import ResumePoint, logger_resume_kwargs

    point = ResumePoint("x.ckpt", global_step=12, log_step=12, wandb_id="run123")
    cfgs = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "logger" / "csv.yaml")
    assert logger_resume_kwargs(cfgs.csv, point) == {"resume_step": 12}
    assert logger_resume_kwargs({"_target_": "lightning.pytorch.loggers.TensorBoardLogger"}, point) == \
        {"purge_step": 12}
    wandb = {"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "p"}
    assert logger_resume_kwargs(wandb, point) == {"id": "run123"}  # with Lightning's resume="allow": online too
    assert logger_resume_kwargs({**wandb, "id": "mine"}, point) == {}  # an id the user set wins
    assert logger_resume_kwargs(wandb, None) == {}
    from lightning.pytorch.loggers import WandbLogger

    init = WandbLogger(project="p", offline=True, **logger_resume_kwargs(wandb, point))._wandb_init
    assert (init["id"], init["resume"]) == ("run123", "allow")
