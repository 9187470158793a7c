"""Where the peak memory of a ``dpo-train`` run goes: the run itself (Hydra entry point, the command line's
overrides), with the process's RSS read at every phase.

    python scripts/memory_account.py model=hf model.name_or_path=DIR data.path=pairs.jsonl ...   # dpo-train's args

``scripts/memory_floor.py --account`` runs it with the benchmark's settings. Linux only (``/proc``): before
each phase the peak-RSS counter is reset (``/proc/self/clear_refs`` = 5), after it ``VmHWM`` is that phase's
peak and ``VmRSS`` what it left resident. Phases: interpreter, imports, config + model build (policy load,
reference copy), data setup (tokenization), fit up to the first step, then per step the forward (reference +
policy), backward and optimizer step, checkpoint writes, the end-of-training callbacks and the export. Beside
the RSS it records the bytes that live tensors hold (weights, gradients, optimizer state) and the LM-head
softmax the engine keeps between forward and backward, so the account can be checked against the figures.
Prints one ``MEMORY_ACCOUNT {json}`` line at exit. The measurement hooks run outside the timed work and
allocate nothing sizeable; the run's own peak (``memory_floor.py``, no hooks) is the figure to compare.
"""

from __future__ import annotations

import atexit
import json
import re
import sys
import time

PHASES: list[dict] = []
_t0 = time.perf_counter()


def status() -> dict[str, float]:
    text = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon",
                                                                                  "RssFile")}


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def mark(name: str, **extra) -> None:
    """End of phase ``name``: its peak (since the last mark) and what it left resident; then reset the peak."""
    s = status()
    PHASES.append({"phase": name, "peak_mb": s["VmHWM"], "rss_mb": s["VmRSS"], "anon_mb": s["RssAnon"],
                   "file_mb": s["RssFile"], "t": time.perf_counter() - _t0, **extra})
    reset_peak()


def tensor_mb(tensors) -> float:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total / 2**20


def instrument(steps_detail: int = 3) -> None:
    """Wrap the entry point's phases (imports are already done) and add the per-step hooks."""
    import lightning as L
    import torch

    import dpo_lightning.reference.reference as reference_mod
    import dpo_lightning.train as T
    import dpo_lightning.training.module as module_mod
    from dpo_lightning.data import datamodule as dm_mod

    load, build_ref, build, export = module_mod.load_causal_lm, reference_mod.build_reference, T.build, T.export_policy

    def load_policy(*a, **k):
        mark("config, validation, wandb check, loss, data module objects")
        out = load(*a, **k)
        mark("policy load (from_pretrained)", weights_mb=tensor_mb(out.parameters()))
        return out

    def reference(*a, **k):
        out = build_ref(*a, **k)
        mark("reference copy", weights_mb=tensor_mb(out.parameters()) if out is not None else 0.0)
        return out

    module_mod.load_causal_lm, reference_mod.build_reference = load_policy, reference

    setup = dm_mod.PreferenceDataModule.setup

    def dm_setup(self, stage=None):
        first = self.train_rows is None
        if first:
            mark("trainer, callbacks, loggers")
        setup(self, stage)
        if first:
            mark("data setup (read, tokenize or cache hit, split)", rows=len(self.train_rows),
                 datasets_imported="datasets" in sys.modules)

    dm_mod.PreferenceDataModule.setup = dm_setup

    class Probe(L.Callback):
        def __init__(self):
            self.step = 0
            self.softmax_mb = 0.0

        def on_train_start(self, trainer, pl_module):
            mark("fit: strategy, optimizer, dataloader, callbacks' setup")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if 0 < self.step <= steps_detail:
                mark(f"step {self.step - 1} -> {self.step}: callbacks, next batch")
            self.before = status()["VmRSS"]
            self.batch = (tuple(batch["input_ids"].shape), int(batch["score_tgt"].numel()))

        def on_before_backward(self, trainer, pl_module, loss):
            if self.step < steps_detail:
                V = pl_module.policy.get_output_embeddings().weight.shape[0]
                kept = min(self.batch[1] * V * 4, pl_module.softmax_cache_mb * 2**20) / 2**20
                mark(f"step {self.step}: forward (reference, then policy)", batch=self.batch, softmax_kept_mb=kept,
                     start_rss_mb=self.before)

        def on_after_backward(self, trainer, pl_module):
            if self.step < steps_detail:
                grads = [p.grad for p in pl_module.policy.parameters()]
                mark(f"step {self.step}: backward", grads_mb=tensor_mb(grads))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.step < steps_detail:
                state = [v for s in trainer.optimizers[0].state.values() for v in s.values() if torch.is_tensor(v)]
                mark(f"step {self.step}: optimizer step, zero_grad",
                     optimizer_state_mb=tensor_mb(state))
            else:
                s = status()
                if PHASES[-1]["phase"] != "later steps":
                    PHASES.append({"phase": "later steps", "peak_mb": 0.0, "rss_mb": 0.0, "steps": 0,
                                   "max_batch": None})
                last = PHASES[-1]
                last["steps"] += 1
                if s["VmHWM"] > last["peak_mb"]:
                    last.update(peak_mb=s["VmHWM"], rss_mb=s["VmRSS"], max_batch=self.batch)
            self.step += 1

        def on_train_epoch_end(self, trainer, pl_module):
            if self.step <= steps_detail:
                mark(f"after step {self.step - 1}")

        def on_train_end(self, trainer, pl_module):
            mark("epoch end (last.ckpt written)")

    probe = Probe()

    def build_probed(cfg, *, with_trainer=True, **kwargs):
        objs = build(cfg, with_trainer=with_trainer, **kwargs)
        if with_trainer:
            objs["trainer"].callbacks.insert(0, probe)  # first: its on_train_end runs before the others'
        return objs

    def export_probed(*a, **k):
        mark("end-of-training callbacks (curves, checkpoint) and summary")
        out = export(*a, **k)
        mark("export (save_pretrained)")
        return out

    T.build, T.export_policy = build_probed, export_probed


def report() -> None:
    mark("summary, exit")
    import resource

    out = {"phases": PHASES, "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "modules": {m: m in sys.modules for m in ("datasets", "pyarrow", "pandas", "matplotlib", "tensorboard",
                                                     "tensorboardX", "wandb", "rich", "torchmetrics", "scipy")}}
    print("MEMORY_ACCOUNT " + json.dumps(out), flush=True)


def main() -> None:
    mark("python interpreter")
    import dpo_lightning.train as T

    mark("imports (dpo_lightning.train: torch, lightning, transformers, hydra)")
    instrument()
    atexit.register(report)
    sys.argv = ["dpo-train"] + sys.argv[1:]
    T.main()


if __name__ == "__main__":
    main()
