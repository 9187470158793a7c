"""A callback for training processes: writes each rank's step and batch count to OUT_DIR/rank<r>.json."""

import json
import os

import lightning as L


class RankSteps(L.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out_dir, exist_ok=True)
        batches = trainer.fit_loop.epoch_loop.batch_progress.total.completed
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
            json.dump({"global_step": trainer.global_step, "batches": batches,
                       "world_size": trainer.world_size}, fh)
