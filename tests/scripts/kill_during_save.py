"""Train with sharded (FSDP) checkpoints every 2 steps (best-step<N>.ckpt, then last.ckpt); SIGKILL this process
inside the second save of last.ckpt (4th save), after its shard files are written and before its metadata is.

Usage: kill_during_save.py SNAPSHOT_DIR OVERRIDE... — SNAPSHOT_DIR receives a copy of the first last.ckpt."""

import os
import shutil
import signal
import sys

import lightning as L
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from dpo_lightning.cli.locate import compose
from dpo_lightning.train import build

calls = []
finish = FileSystemWriter.finish


def finish_or_die(self, metadata, results):
    calls.append(1)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    finish(self, metadata, results)
    if len(calls) == 2:
        shutil.copytree(str(self.path), sys.argv[1])  # what the first last.ckpt holds, to compare with later


FileSystemWriter.finish = finish_or_die
cfg = compose("train", sys.argv[2:])
L.seed_everything(cfg.seed, workers=True)
objs = build(cfg)
objs["trainer"].fit(objs["module"], datamodule=objs["datamodule"])
