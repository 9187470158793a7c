"""Training throughput the ecosystem's way: Lightning's ``ThroughputMonitor`` fed with preference batches.

    trainer = L.Trainer(callbacks=[ThroughputMonitor()], log_every_n_steps=10)     # what callbacks=default adds

Lightning's callback (``lightning.pytorch.callbacks.ThroughputMonitor``) times the loop (data loading included,
validation excluded), keeps a rolling window and logs, per stage, ``device/samples_per_sec``,
``device/items_per_sec``, ``device/flops_per_sec``, ``device/mfu`` (FLOPs / the device's peak from
``get_available_flops``) and, on more than one device, the global ``samples_per_sec`` … . Here a sample is a
preference pair (an unpaired row for KTO: ``pairs_in_batch``) and an item a non-pad token the policy ran over
(``nonpad_tokens``); both functions also serve Lightning's callback directly. On top of Lightning's:

* counts are summed over the ranks every step (Lightning assumes every rank saw what rank 0 saw; with
  variable-length batches they differ), so the global figures are exact on any device count;
* the FLOPs of a batch (``pl_module.flops_per_batch``, Lightning's protocol) are the conventional model FLOPs,
  6·N per processed token for the policy's forward and backward plus 2·N for a live reference's forward
  (2·N each in validation), N = the parameters every token multiplies (``matmul_params``); ``peak_flops``
  gives MFU where Lightning knows no peak (a CPU, a new GPU);
* the names this project documents: ``train/tokens_per_sec``, ``train/pairs_per_sec`` (global, over the
  window, logged from the second step on), ``train/padding_fraction`` (this step, all ranks), and ``summary``:
  the whole run's averages that ``dpo-train`` prints.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from dpo_lightning.models.peft import peft_base


def pairs_in_batch(batch: dict[str, Any]) -> int:
    """Preference pairs (or unpaired rows) in a collated batch."""
    return int(batch["index"].numel())


def nonpad_tokens(batch: dict[str, Any]) -> int:
    """Token positions the model runs over, padding excluded (every layout keeps the 2D real-token mask)."""
    return int(batch["attention_mask"].sum())


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters every token multiplies: all but the input embedding (tied: counted once, as the LM head)."""
    base = peft_base(model)
    total = base.num_parameters() if hasattr(base, "num_parameters") else sum(p.numel() for p in base.parameters())
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if emb is not None and not (head is not None and head.weight is emb.weight):
        total -= emb.weight.numel()
    return int(total)


class ThroughputMonitor(LightningThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for preference batches (see the module docstring).

    Args:
        window: steps of the rolling average (Lightning's ``window_size``; its own figures appear once full).
        peak_flops: the device's peak FLOP/s for MFU where Lightning's table has none (e.g. a measured CPU peak).
        flops: False logs no FLOPs or MFU.
    """

    def __init__(self, window: int = 10, peak_flops: float | None = None, flops: bool = True):
        super().__init__(batch_size_fn=self._samples_fn, length_fn=self._lengths_fn, window_size=max(window, 2))
        self.peak_flops, self.count_flops = peak_flops, flops
        self._step: tuple[float, float, float] | None = None  # this step's global (pairs, tokens, positions)
        self._params, self._world, self._train_flops_per_token = 0, 1, 0
        self.total_pairs = self.total_tokens = self.total_positions = self.train_seconds = 0.0
        self._last = self._val_start = 0.0

    # ------------------------------------------------------------------ Lightning's hooks, aggregated
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops:
            self.available_flops = self.peak_flops
            for throughput in self._throughputs.values():
                throughput.available_flops = self.peak_flops
        policy = getattr(pl_module, "policy", None)
        if self.count_flops and policy is not None and not self._params:
            self._params = matmul_params(policy)  # before a strategy wraps or shards the weights
        self._module_has_flops = bool(self._params) or hasattr(pl_module, "flops_per_batch")

    def _samples_fn(self, batch) -> float:  # per device, as Lightning expects: the global count / world size
        return self._step[0] / self._world if self._step else pairs_in_batch(batch)

    def _lengths_fn(self, batch) -> float:
        return self._step[1] / self._world if self._step else nonpad_tokens(batch)

    def flops_per_token(self, pl_module, training: bool) -> int:
        """6·N (training) or 2·N (evaluation) for the policy, + 2·N for a live reference's forward."""
        live_reference = pl_module.reference.needs_model
        return ((6 if training else 2) + (2 if live_reference else 0)) * self._params

    def _set_flops(self, pl_module, tokens: float, training: bool) -> None:
        if self._params:  # per device (Lightning's contract)
            pl_module.flops_per_batch = self.flops_per_token(pl_module, training) * tokens

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._world, self._train_flops_per_token = trainer.world_size, self.flops_per_token(pl_module, True)
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # nonpad_tokens reads the mask on the device: the step's kernels are done before the clock is read
        counts = [float(pairs_in_batch(batch)), float(nonpad_tokens(batch)), float(batch["input_ids"].numel())]
        if trainer.world_size > 1:  # every rank: a collective
            counts = trainer.strategy.reduce(torch.tensor(counts, dtype=torch.float64, device=pl_module.device),
                                             reduce_op="sum").tolist()
        pairs, tokens, positions = counts
        self._step = (pairs, tokens, positions)
        self.total_pairs, self.total_tokens = self.total_pairs + pairs, self.total_tokens + tokens
        self.total_positions += positions
        now = time.perf_counter()
        self.train_seconds, self._last = self.train_seconds + now - self._last, now
        self._set_flops(pl_module, tokens / trainer.world_size, training=True)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # rank 0: update, log
        self._step = None

    def on_validation_start(self, trainer, *args) -> None:
        super().on_validation_start(trainer, *args)
        self._val_start = time.perf_counter()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args, **kwargs) -> None:
        if not trainer.sanity_checking:
            self._set_flops(pl_module, nonpad_tokens(batch), training=False)
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)

    def on_validation_end(self, trainer, *args) -> None:
        super().on_validation_end(trainer, *args)
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._last += time.perf_counter() - self._val_start  # validation is not training time

    # ------------------------------------------------------------------ logging
    def _compute(self, trainer, iter_num: int | None = None) -> None:
        """Lightning's figures (``train/device/samples_per_sec`` …) plus the names documented here."""
        if not trainer._logger_connector.should_update_logs:
            return
        stage = trainer.state.stage
        throughput = self._throughputs[stage]
        metrics = {f"{stage.value}/{k}": v for k, v in throughput.compute().items()}
        if stage == RunningStage.TRAINING and self._step is not None:
            t, n, lengths = throughput._time, throughput._samples, throughput._lengths
            if len(t) > 1:  # the window so far (Lightning's own rates wait until it is full)
                scale = trainer.world_size / (t[-1] - t[0])
                metrics["train/pairs_per_sec"] = (n[-1] - n[0]) * scale
                metrics["train/tokens_per_sec"] = (lengths[-1] - lengths[0]) * scale
            metrics["train/padding_fraction"] = 1 - self._step[1] / max(self._step[2], 1.0)
        trainer._logger_connector.log_metrics(metrics, step=iter_num)

    @property
    def summary(self) -> dict[str, float]:
        """Whole-run averages over every rank (validation time excluded)."""
        t = max(self.train_seconds, 1e-9)
        out = {"tokens_per_sec": self.total_tokens / t, "pairs_per_sec": self.total_pairs / t,
               "padding_fraction": 1 - self.total_tokens / max(self.total_positions, 1.0),
               "train_seconds": self.train_seconds}
        if self._train_flops_per_token and self.available_flops:
            out["mfu"] = self._train_flops_per_token * self.total_tokens / t / self._world / self.available_flops
        return out
