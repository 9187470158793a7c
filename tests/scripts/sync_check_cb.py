"""A callback for TR-DPO training processes; it must run before ReferenceSync (the module's own callbacks come
after the trainer's). At a sync step it computes the expected mix from the weights before the sync; at the next
batch (or the end) it compares the moved reference's log-probs with those of a fresh model holding the expected
weights. Writes OUT_DIR/rank<r>.json: the differences, the reference version and a digest of its weights."""

import hashlib
import json
import os

import lightning as L
import torch

from dpo_lightning.engine.logprobs import sequence_logps
from dpo_lightning.models.hf import load_causal_lm


class SyncCheck(L.Callback):
    def __init__(self, out_dir, alpha, every):
        self.out_dir, self.alpha, self.every = out_dir, alpha, every
        self.expected, self.diffs, self.last = None, [], -1

    def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
        step = trainer.global_step
        if step > 0 and step % self.every == 0 and step != self.last:
            assert m.reference.version == len(self.diffs), "SyncCheck must run before ReferenceSync"
            pol, ref = m.policy.state_dict(), m.reference.state_dict()
            self.expected = {k: ref[k] * (1 - self.alpha) + pol[k] * self.alpha for k in pol}
            self.batch, self.last = {k: v for k, v in batch.items()}, step

    def _check(self, m):
        if self.expected is None:
            return
        assert m.reference.version == len(self.diffs) + 1
        fresh = load_causal_lm(m.model_spec)
        fresh.load_state_dict(self.expected)
        with torch.no_grad():
            want = sequence_logps(fresh.eval(), self.batch, self.batch["num_sequences"], full_logits=True).logps
            got = m.reference_logps(self.batch).logps
        self.diffs.append(float((got - want).abs().max()))
        self.expected = None

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        self._check(m)

    def on_train_end(self, trainer, m):
        self._check(m)
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in m.reference.parameters()))
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
            json.dump({"diffs": self.diffs, "version": m.reference.version, "reference": digest.hexdigest(),
                       "world_size": trainer.world_size}, fh)
