"""Preemption: a real SIGTERM sent to a running `dpo-train` (one process, and DDP on two CPU processes) saves a
checkpoint at the next optimizer step on every rank and exits with 128 + 15; `ckpt_path=last` with the same run
folder resumes and ends with weights bit-identical (fp32, CPU) to a run that was never interrupted. SLURM's
requeue signal (SIGUSR1 under Lightning's SLURMEnvironment) also calls `scontrol requeue` for the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import script_env

from dpo_lightning.callbacks.preemption import is_complete, latest_checkpoint, resolve_ckpt_path

TIMEOUT = 240
COMMON = ["logger=none", "callbacks=none", "print_config=false", "eval_before=false", "trainer.accelerator=cpu",
          "trainer.val_check_interval=1000", "data.val_fraction=0", "data.max_length=32", "trainer.max_steps=6",
          "optimizer.lr=1e-2", "seed=3"]

def _env(tmp_path: Path, extra: dict | None = None) -> dict:
    """tests/scripts on PYTHONPATH: its pause_cb.PauseAt (at a step, rank 0 writes a marker and waits for the
    signal) makes the test's signal land at a known step."""
    return script_env(OMP_NUM_THREADS="1", **(extra or {}))


def _run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run([sys.executable, "-m", "dpo_lightning.train", *COMMON, *args], capture_output=True,
                             text=True, timeout=TIMEOUT, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"training did not finish in {TIMEOUT}s:\n{(err.stderr or b'')[-3000:]}")
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _interrupt(args: list[str], env: dict, cwd: Path, signum: int, at_step: int = 3) -> tuple[int, str]:
    """Start a run, wait until rank 0 reaches `at_step`, send it `signum`; returns (exit status, output)."""
    marker = cwd / f"reached-{signum}"
    log = (cwd / f"log-{signum}.txt").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "dpo_lightning.train", *COMMON, *args,
                             "+callbacks.pause._target_=pause_cb.PauseAt", f"+callbacks.pause.step={at_step}",
                             f"+callbacks.pause.marker={marker}"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=cwd)
    try:
        deadline = time.time() + TIMEOUT
        while not marker.exists():
            assert proc.poll() is None, f"run ended early:\n{Path(log.name).read_text()[-3000:]}"
            assert time.time() < deadline, "run never reached the step"
            time.sleep(0.1)
        proc.send_signal(signum)  # to rank 0 only (DDP: the launcher's process); the ranks agree on the stop
        code = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    return code, log.read()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "export" / "model.safetensors"))


@pytest.mark.subprocess
@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=[pytest.mark.slow, pytest.mark.distributed])],
                         ids=["single", "ddp"])
def test_sigterm_mid_epoch_then_resume_is_bit_identical(tmp_path, ranks):
    env = _env(tmp_path)
    setup = ["data.batch_size=4"] if ranks == 1 else ["strategy=ddp", "trainer.devices=2", "data.batch_size=2"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    _run([*setup, f"paths.output_dir={straight}"], env, tmp_path)

    code, out = _interrupt([*setup, f"paths.output_dir={broken}"], env, tmp_path, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out[-4000:]
    assert f"SIGTERM: checkpoint {broken}/checkpoints/last.ckpt (step 3)" in out
    assert "Traceback" not in out and not (broken / "export").exists()
    ckpt = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 3  # mid-epoch: 200-odd training pairs make far more than 6 batches an epoch

    res = _run([*setup, f"paths.output_dir={broken}", "ckpt_path=last"], env, tmp_path)
    assert f"resuming from {broken}/checkpoints/last.ckpt" in res.stdout
    a, b = _weights(straight), _weights(broken)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.subprocess
def test_slurm_requeue_signal_saves_requeues_and_exits(tmp_path):
    """Under SLURM (environment of a 1-task job) SIGUSR1 saves the checkpoint at the next step and runs
    `scontrol requeue <job id>` (a stand-in scontrol on PATH records its arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/scontrol-args\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "dpo", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env = _env(tmp_path, slurm)
    run = tmp_path / "run"
    code, out = _interrupt(["data.batch_size=4", "trainer.max_steps=50", f"paths.output_dir={run}"], env, tmp_path,
                           signal.SIGUSR1, at_step=2)
    assert code == 128 + signal.SIGUSR1, out[-4000:]
    assert (tmp_path / "scontrol-args").read_text().split() == ["requeue", "4242"]
    assert latest_checkpoint(run) == str(run / "checkpoints" / "last.ckpt")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_ckpt_path_last_picks_the_newest_complete_checkpoint(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    assert resolve_ckpt_path("last", tmp_path) is None and "starting from the beginning" in capsys.readouterr().out
    torch.save({"a": 1}, ckpts / "best-step2.ckpt")
    time.sleep(0.01)
    torch.save({"a": 2}, ckpts / "last.ckpt")
    time.sleep(0.01)
    (ckpts / "torn.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:100])  # a save cut short (not atomic)
    torch.save({"a": 3}, ckpts / ".last.ckpt.tmp")  # our own temporary name
    assert not is_complete(ckpts / "torn.ckpt")
    assert resolve_ckpt_path("last", tmp_path) == str(ckpts / "last.ckpt")
    assert resolve_ckpt_path("some/file.ckpt", tmp_path) == "some/file.ckpt"
    (ckpts / "step9.ckpt").mkdir()  # a sharded checkpoint folder, renamed into place when complete
    (ckpts / "step9.ckpt" / "meta.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == str(ckpts / "step9.ckpt")


def test_handler_is_ours_during_training_and_the_previous_one_after(tiny_path, default_data_path, tmp_path):
    import lightning as L

    from dpo_lightning import PreferenceDataModule, PreferenceLitModule
    from dpo_lightning.callbacks import PreemptionCheckpoint

    before = signal.getsignal(signal.SIGTERM)
    cb, seen = PreemptionCheckpoint(str(tmp_path)), []

    class Probe(L.Callback):
        def on_train_batch_end(self, *args):
            seen.append(signal.getsignal(signal.SIGTERM) == cb._handler)

    module = PreferenceLitModule(str(tiny_path))
    dm = PreferenceDataModule(default_data_path, str(tiny_path), batch_size=4, max_length=32)
    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[cb, Probe()]).fit(module, datamodule=dm)
    assert seen == [True, True] and signal.getsignal(signal.SIGTERM) == before
    assert cb.received is None and not list(tmp_path.iterdir())  # no signal: nothing saved
