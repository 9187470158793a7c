"""A damaged newest checkpoint: `ckpt_path=last` falls back to the newest readable one and says so; an explicit
`ckpt_path` that does not read stops with one line (exit status 2, no traceback).

Damage of two kinds: a file cut short (a copy tool stopped, a full disk) and bytes changed inside a tensor (a bad
disk sector). Before the fix the second was picked by `ckpt_path=last` (its zip directory reads) and its
weights loaded silently wrong, and an explicit unreadable path ended in Lightning's traceback."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from dpo_lightning.callbacks.resume import CheckpointError, read_resume_point, resume_point


def fake_checkpoint(path: Path, step: int) -> None:
    torch.save({"global_step": step, "state_dict": {"w": torch.arange(4096, dtype=torch.float32) * step},
                "loops": {"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": step - 1}}},
                "callbacks": {"RunState": {"wandb_id": "abc123", "before": {"val/loss": 0.69}}}}, path)


def damage_tensor_bytes(path: Path) -> None:
    """Change bytes inside the largest stored tensor, as a bad sector would; the zip directory still reads."""
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        fh.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        fh.write(b"\xde\xad\xbe\xef")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _checkpoints(tmp_path: Path) -> Path:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    fake_checkpoint(ckpts / "best-step4.ckpt", 4)
    time.sleep(0.01)
    fake_checkpoint(ckpts / "last.ckpt", 6)
    return ckpts


@pytest.mark.parametrize("damage", [truncate, damage_tensor_bytes], ids=["truncated", "damaged-bytes"])
def test_last_falls_back_to_the_newest_readable_checkpoint(tmp_path, capsys, caplog, damage):
    ckpts = _checkpoints(tmp_path)
    point = resume_point("last", tmp_path)
    assert point.path == str(ckpts / "last.ckpt") and point.global_step == 6 and point.log_step == 6
    assert point.wandb_id == "abc123" and point.before == {"val/loss": 0.69}
    damage(ckpts / "last.ckpt")
    capsys.readouterr()
    point = resume_point("last", tmp_path)
    assert point.path == str(ckpts / "best-step4.ckpt") and point.global_step == 4
    out = capsys.readouterr().out
    assert f"resuming from {ckpts / 'best-step4.ckpt'} (newest readable; skipped unreadable last.ckpt)" in out
    assert any("last.ckpt" in r.message for r in caplog.records if r.levelname == "WARNING")
    with pytest.raises(CheckpointError, match="last.ckpt is (damaged|unreadable)"):
        resume_point(str(ckpts / "last.ckpt"), tmp_path)  # named explicitly: no fallback


def test_nothing_readable_stops_and_nothing_at_all_starts_fresh(tmp_path, capsys):
    assert resume_point("last", tmp_path) is None  # a requeued job's first start
    assert "starting from the beginning" in capsys.readouterr().out
    ckpts = _checkpoints(tmp_path)
    truncate(ckpts / "last.ckpt")
    damage_tensor_bytes(ckpts / "best-step4.ckpt")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        resume_point("last", tmp_path)  # not a silent fresh start over a run's damaged state
    with pytest.raises(FileNotFoundError):
        resume_point(str(tmp_path / "missing.ckpt"), tmp_path)
    (ckpts / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError):
        read_resume_point(ckpts / "empty.ckpt")
    assert resume_point(None, tmp_path) is None


@pytest.mark.subprocess
def test_dpo_train_with_a_damaged_checkpoint(tmp_path):
    """End to end: a run's last.ckpt damaged -> `ckpt_path=last` resumes from the best checkpoint and says so;
    the damaged file named explicitly -> one line on stderr, exit status 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    common = [sys.executable, "-m", "dpo_lightning.train", "logger=none", "print_config=false", "eval_before=false",
              "trainer.accelerator=cpu", "data.batch_size=8", "data.max_length=32", "generation.num_prompts=0",
              "callbacks.progress_bar=null", "trainer.val_check_interval=4", "export=false",
              "trainer.enable_model_summary=false", f"paths.output_dir={tmp_path}"]
    res = subprocess.run([*common, "trainer.max_steps=6", "+callbacks.model_checkpoint.every_n_train_steps=2"],
                         capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    best = next((tmp_path / "checkpoints").glob("best-step*.ckpt"))
    damage_tensor_bytes(last)

    res = subprocess.run([*common, f"ckpt_path={last}"], capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {last} is damaged")

    res = subprocess.run([*common, "ckpt_path=last", "trainer.max_steps=8"], capture_output=True, text=True,
                         timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {best} (newest readable; skipped unreadable last.ckpt)" in res.stdout
    # the damaged file stays as it was (Lightning names the new one last-v1.ckpt); `last` now finds step 8
    assert resume_point("last", tmp_path).global_step == 8
