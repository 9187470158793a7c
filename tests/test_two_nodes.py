"""Two nodes on one machine: Lightning's multi-node path (`trainer.num_nodes=2`, one process per "node", gloo on
the CPU) with the rendezvous variables torchrun and SLURM's srun set, over the loopback address 127.0.0.1 only
(and `GLOO_SOCKET_IFNAME=lo`, so gloo's sockets bind to the loopback interface). Train, SIGTERM one node
mid-run (both stop at the same step with one checkpoint), resume with `ckpt_path=last`, and end with weights
bit-identical to an uninterrupted two-node run. docs/scaling.md shows these launch lines."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.subprocess, pytest.mark.slow]
TIMEOUT = 300
LOOPBACK = "127.0.0.1"
ARGS = ["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2", "logger=none",
        "callbacks=none", "print_config=false", "eval_before=false", "data.val_fraction=0", "data.batch_size=2",
        "data.max_length=32", "trainer.max_steps=6", "trainer.val_check_interval=1000", "optimizer.lr=1e-2",
        "seed=3", "trainer.enable_model_summary=false"]

# On the node `rank`, at step `step`: write this process's pid to `marker` and wait for the SIGTERM the test
# sends, so that it lands at a known step. Nothing else in the run changes.
PAUSE = '''
import os, time
from pathlib import Path
import lightning as L

class PauseOn(L.Callback):
    def __init__(self, rank, step, marker):
        self.rank, self.step, self.marker, self.done = int(rank), int(step), marker, False
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step or self.done or trainer.global_rank != self.rank:
            return
        self.done = True
        pre = next(cb for cb in trainer.callbacks if type(cb).__name__ == "PreemptionCheckpoint")
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.time() + 120
        while pre.received is None and time.time() < deadline:
            time.sleep(0.05)
'''


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _env(tmp_path: Path) -> dict:
    (tmp_path / "cb").mkdir(exist_ok=True)
    (tmp_path / "cb" / "pause_node.py").write_text(PAUSE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "MASTER_"))
           and k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONPATH": os.pathsep.join([str(tmp_path / "cb"), env.get("PYTHONPATH", "")])}


def torchrun_node(node: int, port: int, args: list[str]) -> list[str]:
    """docs/scaling.md: `torchrun --nnodes=2 --nproc-per-node=1 --node-rank=N --master-addr=127.0.0.1 ...`."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}",
            f"--master-addr={LOOPBACK}", f"--master-port={port}", "-m", "dpo_lightning.train", *ARGS, *args]


def slurm_task(node: int, port: int, args: list[str]) -> tuple[list[str], dict]:
    """What `srun --nodes=2 --ntasks-per-node=1 python -m dpo_lightning.train ...` starts on node N: the
    command, with the variables srun sets (the node list is the loopback address here)."""
    env = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_PROCID": str(node),
           "SLURM_LOCALID": "0", "SLURM_NODEID": str(node), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "dpo",
           "SLURM_NODELIST": LOOPBACK, "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port)}
    return [sys.executable, "-m", "dpo_lightning.train", *ARGS, *args], env


def launch(kind: str, args: list[str], env: dict, logs: Path) -> list[subprocess.Popen]:
    port, procs = free_port(), []
    for node in (0, 1):
        if kind == "torchrun":
            cmd, extra = torchrun_node(node, port, args), {}
        else:
            cmd, extra = slurm_task(node, port, args)
        out = (logs / f"{kind}-node{node}-{time.monotonic_ns()}.txt").open("w")
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**env, **extra}))
        procs[-1].log_path = out.name
    return procs


def wait_all(procs: list[subprocess.Popen]) -> list[int]:
    deadline = time.time() + TIMEOUT
    try:
        return [p.wait(timeout=max(1, deadline - time.time())) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("a node did not finish:\n" + "\n".join(Path(p.log_path).read_text()[-2000:] for p in procs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def logs_of(procs) -> str:
    return "\n".join(Path(p.log_path).read_text() for p in procs)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "export" / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted two-node run (torchrun)."""
    tmp = tmp_path_factory.mktemp("straight")
    procs = launch("torchrun", [f"paths.output_dir={tmp / 'run'}"], _env(tmp), tmp)
    assert wait_all(procs) == [0, 0], logs_of(procs)[-6000:]
    return tmp / "run"


@pytest.mark.parametrize("kind", ["torchrun", "slurm"])
def test_two_nodes_sigterm_one_node_then_resume_is_bit_identical(tmp_path, straight, kind):
    env, run, marker = _env(tmp_path), tmp_path / "run", tmp_path / "node1-reached"
    procs = launch(kind, [f"paths.output_dir={run}", "+callbacks.pause._target_=pause_node.PauseOn",
                          "+callbacks.pause.rank=1", "+callbacks.pause.step=3", f"+callbacks.pause.marker={marker}"],
                   env, tmp_path)
    deadline = time.time() + TIMEOUT
    while not marker.exists():
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            wait_all(procs)
            pytest.fail(f"node 1 never reached step 3:\n{logs_of(procs)[-6000:]}")
        time.sleep(0.1)
    # SIGTERM node 1 only: torchrun's agent (it forwards the signal to its worker) / srun's task itself
    procs[1].send_signal(signal.SIGTERM)
    codes = wait_all(procs)
    out = logs_of(procs)
    assert all(c != 0 for c in codes), out[-6000:]  # both nodes stopped (128 + 15, or torchrun's failure code)
    assert f"SIGTERM: checkpoint {run}/checkpoints/last.ckpt (step 3)" in out, out[-6000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not (run / "export").exists() and not (run / "run.lock").exists()

    procs = launch(kind, [f"paths.output_dir={run}", "ckpt_path=last"], env, tmp_path)
    assert wait_all(procs) == [0, 0], logs_of(procs)[-6000:]
    assert f"resuming from {run}/checkpoints/last.ckpt" in logs_of(procs)
    a, b = _weights(straight), _weights(run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
