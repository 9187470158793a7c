"""The sweep's pictures, written as PNG files into the sweep folder.

    sweep_beta.png      held-out reward accuracy and margin against beta (log scale), one line per loss
    sweep_curves.png    every job's training curves overlaid (smoothed train loss / accuracy, held-out accuracy)
    sweep_frontier.png  reward against KL from the reference (DPO paper, Fig. 2), when jobs logged gen/kl
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

from dpo_lightning.callbacks.curves import smooth


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    _plt().close(fig)
    os.replace(tmp, path)
    return path


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if f != f else f


def beta_plot(df, path: Path) -> Path | None:
    ok = df[df["status"] == "ok"]
    scored = [(str(r["loss_name"]), _num(r["beta"]), r) for _, r in ok.iterrows()]
    points = [(loss, b, r) for loss, b, r in scored if b is not None and b > 0]
    if not points:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("val/rewards/accuracies", "val/rewards/margins")):
        by_loss: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for loss, b, r in points:
            y = _num(r[metric])
            if y is not None:
                by_loss[loss].append((b, y))
        for loss, pts in sorted(by_loss.items()):
            pts.sort()
            # several jobs at one beta (other swept keys): their mean on the line, each job as a dot
            xs = sorted({b for b, _ in pts})
            means = [sum(y for b, y in pts if b == x) / sum(1 for b, _ in pts if b == x) for x in xs]
            line, = ax.plot(xs, means, marker="o", label=loss)
            ax.scatter(*zip(*pts), color=line.get_color(), alpha=0.35, s=14)
        ax.set_xscale("log")
        betas = sorted({b for _, b, _ in points})
        if len(betas) <= 8:  # label the betas that ran, not log-scale minor ticks
            from matplotlib.ticker import NullFormatter

            ax.set_xticks(betas, [f"{b:g}" for b in betas])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("beta")
        ax.set_title(f"held-out {metric.split('/', 1)[1]}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(title="loss", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _read_curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    try:
        with open(folder / "training_curves.csv") as fh:
            for row in csv.DictReader(fh):
                out[row["metric"]].append((int(row["step"]), float(row["value"])))
    except (OSError, KeyError, ValueError):
        pass
    return out


def curves_plot(df, path: Path) -> Path | None:
    runs = [(str(r["name"] or f"job {r['job']}"), _read_curves(Path(r["run_dir"]))) for _, r in df.iterrows()]
    runs = [(name, c) for name, c in runs if c]
    if not runs:
        return None
    plt = _plt()
    panels = (("train/loss", "train loss (smoothed)"), ("train/rewards/accuracies", "train reward accuracy "
              "(smoothed)"), ("val/rewards/accuracies", "held-out reward accuracy"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, panels):
        for name, curves in runs:
            pts = curves.get(key, [])
            if not pts:
                continue
            steps, values = zip(*pts)
            if key.startswith("train/"):
                line, = ax.plot(steps, smooth(values), lw=1.4, label=name)
                ax.plot(steps, values, color=line.get_color(), alpha=0.12, lw=0.8)
            else:
                ax.plot(steps, values, marker="o", ms=3, lw=1.2, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "train/loss" and all(v > 0 for _, c in runs for _, v in c.get(key, [])):
            ax.set_yscale("log")  # loss scales differ between losses (IPO's is ~1/beta^2)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(labels) <= 12:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 4), 1, 1))
    else:
        fig.tight_layout()
    return _save(fig, path)


def frontier_plot(df, path: Path) -> Path | None:
    if "gen/kl" not in df.columns:
        return None
    ycol = "gen/reward" if "gen/reward" in df.columns else ("gen/win_rate" if "gen/win_rate" in df.columns else None)
    if ycol is None:
        return None
    pts = [(str(r["loss_name"]), _num(r["gen/kl"]), _num(r[ycol]), r["beta"]) for _, r in df.iterrows()
           if r["status"] == "ok"]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4))
    for loss in sorted({p[0] for p in pts}):
        mine = [p for p in pts if p[0] == loss]
        ax.scatter([p[1] for p in mine], [p[2] for p in mine], label=loss, s=28)
        for _, kl, y, beta in mine:
            if _num(beta) is not None:
                ax.annotate(f"β={_num(beta):g}", (kl, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("KL(policy || reference) (gen/kl)")
    ax.set_ylabel(ycol)
    ax.set_title("reward-KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(title="loss", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def write_plots(df, sweep_dir: Path) -> list[Path]:
    """Every plot the data allows; returns the written PNG paths."""
    made = [beta_plot(df, sweep_dir / "sweep_beta.png"), curves_plot(df, sweep_dir / "sweep_curves.png"),
            frontier_plot(df, sweep_dir / "sweep_frontier.png")]
    return [p for p in made if p is not None]
