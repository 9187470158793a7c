"""Which held-out metric selects the best checkpoint, chosen in one place from the loss and the data.

    selection_metric(loss, from_pairs)  ->  ("val/rewards/accuracies", "max") when the data has pairs
                                            (paired losses, or unpaired losses on pairs split into rows),
                                            ("val/loss", "min") otherwise (KTO/BCO on natively unpaired rows:
                                            no pair, so no reward accuracy is logged)

``PreferenceCheckpoint`` is Lightning's ``ModelCheckpoint`` with ``monitor="auto"`` resolved from the
module's loss and the data module when training starts (any explicit ``monitor`` is kept as given).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint


def selection_metric(loss: Any, from_pairs: bool) -> tuple[str, str]:
    """(metric, mode): reward accuracy (comparable across loss types) when pairs exist, else the loss."""
    if getattr(loss, "paired", True) or from_pairs:
        return "val/rewards/accuracies", "max"
    return "val/loss", "min"


def metric_mode(metric: str) -> str:
    """``min`` for a loss (``val/loss``, ``val/nll_loss``, ...), ``max`` for anything else (accuracies, margins)."""
    return "min" if metric.rsplit("/", 1)[-1].endswith("loss") else "max"


class PreferenceCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``monitor="auto"`` follows ``selection_metric`` and whose ``mode="auto"``
    follows the monitored metric (``metric_mode``)."""

    def __init__(self, *args: Any, monitor: str | None = "auto", mode: str = "auto", **kwargs: Any) -> None:
        self._auto_monitor, self._auto_mode = monitor == "auto", mode == "auto"
        if self._auto_mode and not self._auto_monitor and monitor:
            mode, self._auto_mode = metric_mode(monitor), False
        super().__init__(*args, monitor=None if self._auto_monitor else monitor,  # type: ignore[misc]  # keywords
                         mode="max" if self._auto_mode else mode, **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._auto_monitor:
            loss = getattr(pl_module, "loss_fn", None)
            self.monitor, mode = selection_metric(loss, bool(getattr(trainer.datamodule, "from_pairs", False)))
            if self._auto_mode:
                self.mode = mode
                self.kth_value = torch.tensor(torch.inf if mode == "min" else -torch.inf)
        super().setup(trainer, pl_module, stage)
