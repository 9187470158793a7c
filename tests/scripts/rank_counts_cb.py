"""A callback for training processes: writes the pairs and non-pad tokens each rank trained on to
OUT_DIR/rank<r>.json."""

import json
import os

import lightning as L


class RankCounts(L.Callback):
    def __init__(self, out_dir):
        self.out_dir, self.pairs, self.tokens = out_dir, 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.pairs += int(batch["index"].numel())
        self.tokens += int(batch["attention_mask"].sum())

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
            json.dump({"pairs": self.pairs, "tokens": self.tokens}, fh)
