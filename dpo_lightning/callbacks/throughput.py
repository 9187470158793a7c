"""Training throughput: non-pad tokens/s, pairs/s and the padding fraction, logged and summarized."""

from __future__ import annotations

import time
from collections import deque

import lightning as L
import torch


class ThroughputMonitor(L.Callback):
    """Logs ``train/tokens_per_sec`` (non-pad tokens through the policy), ``train/pairs_per_sec`` and
    ``train/padding_fraction`` over a moving window; ``summary`` holds the whole-run averages."""

    def __init__(self, window: int = 20):
        self.window = window
        self._times: deque = deque(maxlen=window)
        self._tokens: deque = deque(maxlen=window)
        self._pairs: deque = deque(maxlen=window)
        self.total_time = self.total_tokens = self.total_pairs = self.total_padded = 0.0
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t0 is None:
            return
        dt = time.perf_counter() - self._t0
        mask = batch["attention_mask"]
        tokens = float(mask.sum()) if mask.dim() == 2 else float(batch["input_ids"].ne(-1).sum())
        padded = float(batch["input_ids"].numel())
        pairs = float(batch["index"].numel())
        self._times.append(dt)
        self._tokens.append(tokens)
        self._pairs.append(pairs)
        self.total_time += dt
        self.total_tokens += tokens
        self.total_pairs += pairs
        self.total_padded += padded
        t = sum(self._times)
        pl_module.log_dict({
            "train/tokens_per_sec": torch.tensor(sum(self._tokens) / t),
            "train/pairs_per_sec": torch.tensor(sum(self._pairs) / t),
            "train/padding_fraction": torch.tensor(1 - tokens / max(padded, 1.0)),
        }, on_step=True, on_epoch=False, batch_size=int(pairs))

    @property
    def summary(self) -> dict[str, float]:
        t = max(self.total_time, 1e-9)
        return {
            "tokens_per_sec": self.total_tokens / t,
            "pairs_per_sec": self.total_pairs / t,
            "padding_fraction": 1 - self.total_tokens / max(self.total_padded, 1.0),
            "train_seconds": self.total_time,
        }
