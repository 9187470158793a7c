"""The sweep's pictures, written as PNG files into the sweep folder.

    sweep_beta.png      the objective and held-out reward accuracy against beta (log scale), one colour per loss,
                        standard errors as bars; losses at the same beta are set slightly apart so none hides another
    sweep_curves.png    every job's training curves: train loss relative to its start (losses of different scales
                        share one axis), train reward accuracy, and the held-out objective at each validation
    sweep_frontier.png  objective (or the judge's reward / win rate) against KL from the reference (DPO paper,
                        Fig. 2), when jobs logged gen/kl

Labels are short (``ipo β=0.1 lr=1e-06``: the swept values, not the full override strings); legends sit below the
panels inside the figure; beyond ``MAX_LEGEND`` jobs lines are coloured by loss and the legend names the losses.
``*_figure`` functions return the figure (tests measure it), ``*_plot`` write it.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

from dpo_lightning.callbacks.curves import smooth
from dpo_lightning.sweeps.job import short_label, short_value

MAX_LEGEND = 10  # more jobs than this: one legend entry per loss


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path | None:
    if fig is None:
        return None
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


def _swept(df) -> list[str]:
    from dpo_lightning.sweeps.columns import override_columns

    cols = override_columns(df)
    varying = [c for c in cols if df[c].astype(str).nunique() > 1]
    return varying or cols


def _labels(df) -> dict:
    keys = _swept(df)
    out = {}
    for _, r in df.iterrows():
        ov = {k: r[k] for k in keys if k in r and r[k] is not None and r[k] == r[k]}
        out[r["job"]] = f"{r['job']}: {short_label(ov, keys)}".strip()
    return out


def _objective(df) -> tuple[str, str]:
    """(column, axis title) of the sweep's objective."""
    from dpo_lightning.sweeps.columns import objective_name

    key = objective_name(df)
    title = {"val/pref_loglik": "held-out pref. log-lik. (β₀=0.1)", "gen/win_rate": "judge win rate",
             "val/rewards/accuracies": "held-out reward accuracy"}.get(key, key)
    return key, title


def _colors(names):
    plt = _plt()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {n: cycle[i % len(cycle)] for i, n in enumerate(sorted(names))}


def _legend_below(fig, handles, labels, title: str | None = None):
    """A legend under the panels, inside the figure (constrained layout makes room for it)."""
    if not handles:
        return None
    width = max(len(str(lab)) for lab in labels)
    ncol = max(1, min(len(labels), int(fig.get_figwidth() * 100 / (7 * width + 40))))
    return fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False,
                      title=title, title_fontsize=8)


def _log_beta_axis(ax, betas: list[float]) -> None:
    """Log-scale beta axis: the betas that ran as tick labels (3 significant digits) when they are few and
    spread apart, else matplotlib's decade ticks."""
    from matplotlib.ticker import LogFormatterSciNotation, NullFormatter

    ax.set_xscale("log")
    distinct = sorted(set(betas))
    spread = all(b2 / b1 >= 1.6 for b1, b2 in zip(distinct, distinct[1:]))
    if 1 <= len(distinct) <= 6 and spread:
        ax.set_xticks(distinct, [short_value(b) for b in distinct])
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.xaxis.set_major_formatter(LogFormatterSciNotation())
        ax.xaxis.set_minor_formatter(NullFormatter())
    lo, hi = min(distinct), max(distinct)
    ax.set_xlim(lo / 1.6, hi * 1.6)


def beta_figure(df):
    ok = df[df["status"] == "ok"]
    points = [(str(r["loss_name"]), _num(r["beta"]), r) for _, r in ok.iterrows()]
    points = [(loss, b, r) for loss, b, r in points if b is not None and b > 0]
    if not points:
        return None
    from dpo_lightning.sweeps.columns import SE

    key, title = _objective(df)
    metrics = [(key, title)]
    if key != "val/rewards/accuracies" and "val/rewards/accuracies" in df:
        metrics.append(("val/rewards/accuracies", "held-out reward accuracy"))
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.9), layout="constrained", squeeze=False)
    losses = sorted({p[0] for p in points})
    colors = _colors(losses)
    # losses at the same beta are set apart by a small factor on the log axis (else they hide each other)
    dodge = {loss: 10 ** (0.025 * (i - (len(losses) - 1) / 2)) for i, loss in enumerate(losses)}
    handles = {}
    for ax, (metric, label) in zip(axes[0], metrics):
        for loss in losses:
            pts = []
            for lo, b, r in points:
                y = _num(r.get(metric)) if lo == loss else None
                if y is not None:
                    pts.append((b, y, _num(r.get(metric + SE)) or 0.0))
            if not pts:
                continue
            pts.sort()
            xs = [b * dodge[loss] for b, _, _ in pts]
            h = ax.errorbar(xs, [y for _, y, _ in pts], yerr=[e for _, _, e in pts], fmt="o", ms=4, capsize=2,
                            color=colors[loss], lw=1, label=loss)
            by_beta = defaultdict(list)  # several jobs at one beta (other swept keys): a line through their mean
            for b, y, _ in pts:
                by_beta[b].append(y)
            if len(by_beta) > 1:
                bs = sorted(by_beta)
                ax.plot([b * dodge[loss] for b in bs], [sum(by_beta[b]) / len(by_beta[b]) for b in bs],
                        color=colors[loss], alpha=0.5, lw=1)
            handles[loss] = h
        _log_beta_axis(ax, [b for _, b, _ in points])
        ax.set_xlabel("beta (log scale)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, which="major")
    _legend_below(fig, list(handles.values()), list(handles), title="loss (bars: ± 1 standard error)")
    return fig


def _read_curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    try:
        with open(folder / "training_curves.csv") as fh:
            for row in csv.DictReader(fh):
                out[row["metric"]].append((int(row["step"]), float(row["value"])))
    except (OSError, KeyError, ValueError):
        pass
    return out


def curves_figure(df):
    labels = _labels(df)
    runs = [(r["job"], str(r.get("loss_name") or ""), _read_curves(Path(r["run_dir"]))) for _, r in df.iterrows()]
    runs = [(job, loss, c) for job, loss, c in runs if c]
    if not runs:
        return None
    key, title = _objective(df)
    held = key if any(c.get(key) for _, _, c in runs) else "val/rewards/accuracies"
    held_title = title if held == key else "held-out reward accuracy"
    by_loss = len(runs) > MAX_LEGEND
    colors = _colors({loss for _, loss, _ in runs}) if by_loss else _colors([str(j) for j, _, _ in runs])
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), layout="constrained")
    panels = (("train/loss", "train loss / its start (smoothed)"),
              ("train/rewards/accuracies", "train reward accuracy (smoothed)"),
              (held, f"{held_title} at each validation"))
    handles: dict[str, object] = {}
    for ax, (metric, name) in zip(axes, panels):
        for job, loss, curves in runs:
            pts = curves.get(metric, [])
            if not pts:
                continue
            color = colors[loss] if by_loss else colors[str(job)]
            label = loss if by_loss else labels.get(job, str(job))
            steps, values = zip(*pts)
            if metric.startswith("train/"):
                values = smooth(values)
                if metric == "train/loss":  # relative to the start: IPO's ~20 and sigmoid's ~0.7 on one axis
                    start = sum(values[:5]) / len(values[:5])
                    if not start > 0:
                        continue
                    values = [v / start for v in values]
                line, = ax.plot(steps, values, lw=1.3, color=color, alpha=0.8 if by_loss else 1.0)
            else:  # few validations: markers, joined only when there are enough of them to make a curve
                line, = ax.plot(steps, values, marker="o", ms=3.5, lw=1.1 if len(pts) >= 3 else 0,
                                color=color)
            handles.setdefault(label, line)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    title = "loss" if by_loss else "job: swept values"
    _legend_below(fig, list(handles.values()), list(handles), title=title)
    return fig


def frontier_figure(df):
    from dpo_lightning.sweeps.columns import SE

    if "gen/kl" not in df.columns:
        return None
    key, title = _objective(df)
    ycol, ylabel = next(((c, t) for c, t in (("gen/reward", "judge reward"), ("gen/win_rate", "judge win rate"),
                                            (key, title)) if c in df.columns and df[c].notna().any()), (None, None))
    if ycol is None:
        return None
    rows = [r for _, r in df.iterrows() if r["status"] == "ok" and _num(r["gen/kl"]) is not None
            and _num(r[ycol]) is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
    losses = sorted({str(r["loss_name"]) for r in rows})
    colors = _colors(losses)
    handles = {}
    for r in rows:
        loss = str(r["loss_name"])
        xe, ye = _num(r.get("gen/kl" + SE)) or 0.0, _num(r.get(ycol + SE)) or 0.0
        h = ax.errorbar([_num(r["gen/kl"])], [_num(r[ycol])], xerr=[xe], yerr=[ye], fmt="o", ms=5, capsize=2,
                        color=colors[loss], lw=1)
        handles.setdefault(loss, h)
        if _num(r["beta"]) is not None and len(rows) <= 12:
            ax.annotate(f"β={short_value(r['beta'])}", (_num(r["gen/kl"]), _num(r[ycol])), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("KL(policy ‖ reference) per sample (gen/kl)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} against KL from the reference", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_below(fig, list(handles.values()), list(handles), title="loss")
    return fig


def beta_plot(df, path: Path) -> Path | None:
    return _save(beta_figure(df), path)


def curves_plot(df, path: Path) -> Path | None:
    return _save(curves_figure(df), path)


def frontier_plot(df, path: Path) -> Path | None:
    return _save(frontier_figure(df), path)


def write_plots(df, sweep_dir: Path) -> list[Path]:
    """Every plot the data allows; returns the written PNG paths."""
    made = [beta_plot(df, sweep_dir / "sweep_beta.png"), curves_plot(df, sweep_dir / "sweep_curves.png"),
            frontier_plot(df, sweep_dir / "sweep_frontier.png")]
    return [p for p in made if p is not None]


__all__ = ["beta_figure", "curves_figure", "frontier_figure", "short_label", "short_value", "write_plots"]
