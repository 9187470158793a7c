"""A callback that poisons the policy's forward (NaN out of the input embeddings) on chosen (rank, micro-batch)
pairs, ``at="rank:batch,..."`` (batch -1: every micro-batch of that rank), and records per micro-batch the step,
the skip count, the rows and a checksum of the policy weights before and after (OUT_DIR/rank<r>.json if given).
Used in-process and by training processes."""

import json
import os

import lightning as L


class InjectNaN(L.Callback):
    def __init__(self, at, out_dir=None):
        self.at = {(int(r), int(b)) for r, b in (x.split(":") for x in str(at).split(","))}
        self.out_dir, self.hook, self.records = out_dir, None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = float(sum(p.detach().double().sum() for p in pl_module.policy.parameters()))
        if (trainer.global_rank, batch_idx) in self.at or (trainer.global_rank, -1) in self.at:
            emb = pl_module.policy.get_input_embeddings()
            self.hook = emb.register_forward_hook(lambda m, i, o: o * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        after = float(sum(p.detach().double().sum() for p in pl_module.policy.parameters()))
        self.records.append({"batch": batch_idx, "step": trainer.global_step, "before": self.before,
                             "after": after, "skipped": pl_module.nonfinite.skipped,
                             "rows": batch["index"].tolist()})
        if self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
                json.dump(self.records, fh)
