"""Sweep plots a reader can read: at 3, 6 and 20 jobs and for searches, no legend, title or tick label leaves
the figure and no two tick labels overlap (measured with the renderer, not by eye)."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from dpo_lightning.sweeps import load  # noqa: E402
from dpo_lightning.sweeps.job import short_label  # noqa: E402
from dpo_lightning.sweeps.plots import beta_figure, curves_figure, frontier_figure  # noqa: E402
from tests.sweep_fixtures import fake_grid, fake_search  # noqa: E402

SWEEPS = {"grid3": lambda r: fake_grid(r, 3), "grid6": lambda r: fake_grid(r, 6),
          "grid20": lambda r: fake_grid(r, 20), "search10": lambda r: fake_search(r, 10),
          "search3": lambda r: fake_search(r, 3)}


def _inside(inner, outer, tol: float = 1.0) -> bool:
    return (inner.x0 >= outer.x0 - tol and inner.y0 >= outer.y0 - tol and inner.x1 <= outer.x1 + tol
            and inner.y1 <= outer.y1 + tol)


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 - 0.5 and b.x0 < a.x1 - 0.5 and a.y0 < b.y1 - 0.5 and b.y0 < a.y1 - 0.5


def readability_problems(fig) -> list[str]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    problems = []
    for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]:
        if not _inside(legend.get_window_extent(renderer), box):
            problems.append("a legend extends outside the figure")
    for ax in fig.axes:
        for text in (ax.title, ax.xaxis.label, ax.yaxis.label):
            if text.get_text() and not _inside(text.get_window_extent(renderer), box):
                problems.append(f"{text.get_text()!r} extends outside the figure")
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
            lo, hi = sorted(axis.get_view_interval())
            labels = [t for t in labels if lo - 1e-12 <= (t.get_position()[0] if axis is ax.xaxis
                                                          else t.get_position()[1]) <= hi + 1e-12]
            extents = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
            for text, ext in extents:
                if not _inside(ext, box):
                    problems.append(f"tick label {text!r} extends outside the figure")
            for (ta, a), (tb, b) in itertools.combinations(extents, 2):
                if _overlap(a, b):
                    problems.append(f"tick labels {ta!r} and {tb!r} overlap")
    return problems


@pytest.mark.parametrize("sweep", sorted(SWEEPS))
def test_every_sweep_plot_is_readable(sweep, tmp_path):
    root = tmp_path / sweep
    root.mkdir()
    SWEEPS[sweep](root)
    df = load(root)
    for make in (beta_figure, curves_figure, frontier_figure):
        fig = make(df)
        assert fig is not None, (make.__name__, sweep)
        try:
            assert readability_problems(fig) == [], (make.__name__, sweep)
        finally:
            plt.close(fig)


def test_checks_catch_a_cut_legend_and_overlapping_ticks():
    """The measuring itself: the old curves legend of full override strings, and search betas as ticks."""
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([1, 2], [1, 2], label="loss=ipo,loss.beta=0.02051080282348,optimizer.lr=1.7e-07," * 2)
    fig.legend(loc="lower center")
    ax.set_xscale("log")
    ax.set_xticks([0.0205108028, 0.0251080282, 0.0310802823], ["0.0205108028", "0.0251080282", "0.0310802823"])
    problems = readability_problems(fig)
    plt.close(fig)
    assert any("legend" in p for p in problems) and any("overlap" in p for p in problems)


def test_labels_and_wandb_names_are_short():
    long = {"loss": "ipo", "loss.beta": "0.02051080282348", "optimizer.lr": "1.7e-07", "trainer.max_steps": "30"}
    assert short_label(long, ["loss", "loss.beta", "optimizer.lr"]) == "ipo β=0.0205 lr=1.7e-07"
