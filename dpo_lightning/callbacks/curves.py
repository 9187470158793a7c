"""Training curves as a picture: loss, reward accuracy and reward margin per step, train and held-out.

Per-step train values are noisy: a smoothed line (debiased exponential moving average, as TensorBoard's) is
drawn over the raw values, which stay faint behind it. Held-out points include the validations run after
``fit`` (``dpo-train``'s final validation), so the last point is the summary's "after" value.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import lightning as L

PANELS = ("loss", "rewards/accuracies", "rewards/margins")
RECORDED = ("pref_loglik",)  # held-out values kept in the CSV (the sweep's curves plot) but not drawn here


def smooth(values, weight: float | None = None) -> list[float]:
    """Debiased exponential moving average; ``weight`` defaults to 1 - 10/n within [0.6, 0.97] (n points)."""
    values = [float(v) for v in values]
    if weight is None:
        weight = min(0.97, max(0.6, 1 - 10 / max(len(values), 1)))
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


class TrainingCurves(L.Callback):
    """Record ``train/*`` every step and ``val/*`` every validation; write ``<dirpath>/training_curves.png``
    (and ``.csv``) when training ends. ``dirpath`` defaults to the trainer's ``default_root_dir``."""

    def __init__(self, dirpath: str | None = None, panels: tuple[str, ...] = PANELS):
        self.dirpath, self.panels = dirpath, tuple(panels)
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.path: Path | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._record(trainer, "train")

    def state_dict(self) -> dict:
        """The history travels in the checkpoint: a resumed run's curves start at step 0, not at the resume."""
        return {"history": {k: [list(p) for p in pts] for k, pts in self.history.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = defaultdict(list, {k: [(int(s), float(v)) for s, v in pts]
                                          for k, pts in state_dict.get("history", {}).items()})

    def _record(self, trainer, split: str) -> None:
        metrics = trainer.callback_metrics
        for name in (*self.panels, *(RECORDED if split == "val" else ())):
            key = f"{split}/{name}"
            if key in metrics:
                pts = self.history[key]
                if split == "val" and pts and pts[-1][0] == trainer.global_step:
                    pts.pop()  # validated twice at one step (in fit, then after it): keep the latest
                pts.append((trainer.global_step, float(metrics[key])))

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and self.history:
            self.path = self.save(Path(self.dirpath or trainer.default_root_dir))

    def on_validation_end(self, trainer, pl_module):
        """Record the held-out values (here, after every epoch-end hook: the module logs ``val/pref_loglik`` in
        its own); a validation run after ``fit`` (``trainer.validate``): redraw with its held-out point."""
        if not trainer.sanity_checking:
            self._record(trainer, "val")
        if self.path is not None and not trainer.sanity_checking and trainer.state.fn == "validate" \
                and trainer.is_global_zero:
            self.path = self.save(self.path.parent)

    def save(self, folder: Path) -> Path:
        """Write the PNG (and the numbers as CSV) atomically; returns the PNG path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from dpo_lightning.files.atomic import atomic_write_text

        folder.mkdir(parents=True, exist_ok=True)
        fig, axes = plt.subplots(1, len(self.panels), figsize=(4.2 * len(self.panels), 3.4))
        for ax, name in zip(axes, self.panels):
            pts = self.history.get(f"train/{name}", [])
            if pts:
                steps, values = zip(*pts)
                line, = ax.plot(steps, smooth(values), lw=1.6, label="train (smoothed)")
                ax.plot(steps, values, color=line.get_color(), alpha=0.2, lw=0.8, label="train (per step)")
            pts = self.history.get(f"val/{name}", [])
            if pts:
                ax.plot(*zip(*pts), marker="o", lw=2, label="held-out")
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
