"""Two runs, one folder: a second `dpo-train` writing into a run folder that a live run holds is refused with
the holder's pid and host; a lock left by a dead process is taken over; only the launching process (global
rank 0) of a DDP run takes the lock, its other ranks share it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from dpo_lightning.cli.run_lock import LOCK_NAME, RunFolderBusy, RunLock, rank_from_env


def test_a_live_holder_refuses_a_second_run(tmp_path):
    with RunLock(tmp_path) as first:
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(RunFolderBusy, match=rf"in use by dpo-train pid {os.getpid()} on host "):
            RunLock(tmp_path).acquire()  # flock is per open file: a second open in this process is refused too
        assert first._fd is not None
    assert not (tmp_path / LOCK_NAME).exists()  # released: removed
    RunLock(tmp_path).acquire().release()  # and free again


@pytest.mark.subprocess
def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    code = (f"import os; from dpo_lightning.cli.run_lock import RunLock; RunLock({str(tmp_path)!r}).acquire(); "
            "os._exit(0)")  # exits holding the lock, as a killed run would: the file stays, the flock goes
    dead = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=60)
    assert dead.returncode == 0 and (tmp_path / LOCK_NAME).exists()
    old = json.loads((tmp_path / LOCK_NAME).read_text())
    with RunLock(tmp_path):
        assert f"taking over {tmp_path / LOCK_NAME}: its holder (pid {old['pid']}" in capsys.readouterr().out
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("env, zero", [({}, True), ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
                                       ({"LOCAL_RANK": "1"}, False), ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
                                       ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, True),
                                       ({"SLURM_PROCID": "3"}, False), ({"RANK": "2"}, False)])
def test_only_the_launching_process_takes_the_lock(tmp_path, monkeypatch, env, zero):
    for name in ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert (rank_from_env() == 0) is zero
    with RunLock(tmp_path) as lock:
        assert lock.enabled is zero and (tmp_path / LOCK_NAME).exists() is zero


WAIT = '''
import time
from pathlib import Path
import lightning as L

class WaitAt(L.Callback):
    """At step `step`: write `marker`, then wait until `release` exists (the test runs a second dpo-train)."""
    def __init__(self, step, marker, release):
        self.step, self.marker, self.release = int(step), Path(marker), Path(release)
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.marker.write_text("reached")
            deadline = time.time() + 180
            while not self.release.exists() and time.time() < deadline:
                time.sleep(0.05)
'''


@pytest.mark.subprocess
def test_second_dpo_train_into_a_live_run_folder_is_refused(tmp_path):
    (tmp_path / "cb").mkdir()
    (tmp_path / "cb" / "wait_cb.py").write_text(WAIT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "cb"), os.environ.get("PYTHONPATH", "")])}
    run, marker, release = tmp_path / "run", tmp_path / "reached", tmp_path / "release"
    common = [sys.executable, "-m", "dpo_lightning.train", "logger=none", "print_config=false", "eval_before=false",
              "trainer.accelerator=cpu", "data.batch_size=8", "data.max_length=32", "generation.num_prompts=0",
              "callbacks=none", "export=false", "trainer.max_steps=3", "trainer.enable_model_summary=false",
              f"paths.output_dir={run}"]
    first = subprocess.Popen([*common, "+callbacks.wait._target_=wait_cb.WaitAt", "+callbacks.wait.step=2",
                              f"+callbacks.wait.marker={marker}", f"+callbacks.wait.release={release}"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert first.poll() is None and time.time() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.1)
        second = subprocess.run(common, capture_output=True, text=True, timeout=240, env=env)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: run folder {run} is in use by dpo-train pid {first.pid} on host "
                               f"{socket.gethostname()}"), line
        release.write_text("go")
        assert first.wait(timeout=240) == 0
    finally:
        release.write_text("go")
        if first.poll() is None:
            first.kill()
    assert not (run / LOCK_NAME).exists()
