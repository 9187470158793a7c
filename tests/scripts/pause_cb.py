"""A callback for a training process: at step ``step``, rank 0 writes ``marker`` (its pid) and waits (up to 120 s)
for the preemption signal, so a test's signal lands at a known step. Nothing else in the run changes."""

import os
import time
from pathlib import Path

import lightning as L


class PauseAt(L.Callback):
    def __init__(self, step, marker):
        self.step, self.marker, self.done = int(step), marker, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step or self.done or not trainer.is_global_zero:
            return
        self.done = True
        pre = next(cb for cb in trainer.callbacks if type(cb).__name__ == "PreemptionCheckpoint")
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.time() + 120
        while pre.received is None and time.time() < deadline:
            time.sleep(0.05)
