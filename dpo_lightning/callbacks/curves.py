"""Training curves as a picture: loss, reward accuracy and reward margin per step, train and held-out."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import lightning as L

PANELS = ("loss", "rewards/accuracies", "rewards/margins")


class TrainingCurves(L.Callback):
    """Record ``train/*`` every step and ``val/*`` every validation; write ``<dirpath>/training_curves.png``
    (and ``.csv``) when training ends. ``dirpath`` defaults to the trainer's ``default_root_dir``."""

    def __init__(self, dirpath: str | None = None, panels: tuple[str, ...] = PANELS):
        self.dirpath, self.panels = dirpath, tuple(panels)
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.path: Path | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._record(trainer, "train")

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._record(trainer, "val")

    def _record(self, trainer, split: str) -> None:
        metrics = trainer.callback_metrics
        for name in self.panels:
            key = f"{split}/{name}"
            if key in metrics:
                self.history[key].append((trainer.global_step, float(metrics[key])))

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and self.history:
            self.path = self.save(Path(self.dirpath or trainer.default_root_dir))

    def save(self, folder: Path) -> Path:
        """Write the PNG (and the numbers as CSV) atomically; returns the PNG path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from dpo_lightning.io import atomic_write_text

        folder.mkdir(parents=True, exist_ok=True)
        fig, axes = plt.subplots(1, len(self.panels), figsize=(4.2 * len(self.panels), 3.4))
        for ax, name in zip(axes, self.panels):
            for split, style in (("train", dict(alpha=0.6, lw=1)), ("val", dict(marker="o", lw=2))):
                pts = self.history.get(f"{split}/{name}", [])
                if pts:
                    ax.plot(*zip(*pts), label=split, **style)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        png = folder / "training_curves.png"
        tmp = folder / ".training_curves.png.tmp"
        fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        os.replace(tmp, png)
        rows = ["metric,step,value"] + [f"{k},{s},{v}" for k, pts in sorted(self.history.items()) for s, v in pts]
        atomic_write_text(folder / "training_curves.csv", "\n".join(rows) + "\n")
        return png
