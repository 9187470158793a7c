"""The sweep report: one row per job, read from the job folders (no Hydra, works on a running sweep too).

    dpo-sweep-report outputs/train/multiruns/2026-01-01_12-00-00     # rebuild (also mid-sweep or interrupted)
    from dpo_lightning.sweeps import load; df = load(folder)           # the same table as a pandas DataFrame

Writes into the sweep folder: ``sweep_report.csv`` (every overridden key as its own column, status, final
held-out metrics, steps, wall time, run folder, W&B run id, generation metrics when logged), ``sweep_report.md``
(best job first), and the plots of ``plots.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpo_lightning.files.atomic import atomic_write_text
from dpo_lightning.sweeps.columns import OBJECTIVE, SE, TAIL, WITH_SE, objective_name, override_columns
from dpo_lightning.sweeps.job import FINAL_METRICS, GEN_METRICS, SUMMARY_FILE


def job_folders(sweep_dir: str | Path) -> list[Path]:
    """Job folders of a sweep: those with a ``job_summary.json`` or Hydra's ``.hydra`` folder, in job order."""
    root = Path(sweep_dir)
    found = {p.parent for p in root.glob(f"*/{SUMMARY_FILE}")} | {p.parent for p in root.glob("*/.hydra")}

    def order(p: Path):
        return (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name)
    return sorted(found, key=order)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _overrides_from_hydra(folder: Path) -> dict[str, str]:
    import yaml

    from dpo_lightning.sweeps.job import parse_overrides

    try:
        return parse_overrides([str(x) for x in yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())])
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _value(text: Any) -> Any:
    """Override values are strings; numbers become numbers so that columns sort and plot."""
    if not isinstance(text, str):
        return text
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per job: ``job``, ``name``, override columns, ``status`` and the summary's fields."""
    rows = []
    for folder in job_folders(sweep_dir):
        summary = _read_json(folder / SUMMARY_FILE) or {}
        job = summary.get("job") or {}
        overrides = job.get("overrides") or _overrides_from_hydra(folder)
        status = summary.get("status") or "not started"
        if status == "running":
            status = "running/interrupted"
        row: dict[str, Any] = {"job": int(folder.name) if folder.name.isdigit() else folder.name,
                               "name": job.get("name") or ",".join(f"{k}={v}" for k, v in overrides.items())}
        row.update({k: _value(v) for k, v in overrides.items()})
        row["status"] = status
        metrics = summary.get("metrics") or {}
        heldout = summary.get("heldout") or {}
        row["objective"] = (summary.get("objective") or {}).get("name")
        for k in FINAL_METRICS:
            row[k] = heldout[k]["mean"] if k in heldout else metrics.get(k)
            if k in WITH_SE:
                row[k + SE] = heldout[k]["stderr"] if k in heldout else None
        for k in GEN_METRICS:
            if k in metrics and not k.endswith("_stderr"):
                row[k] = metrics[k]
                if k in WITH_SE:
                    row[k + SE] = metrics.get(f"{k}_stderr")
        row["heldout_rows"] = (heldout.get(OBJECTIVE) or {}).get("n")
        row.update({k: summary.get(k) for k in TAIL})
        row["run_dir"] = str(folder)
        rows.append(row)
    return rows


def load(sweep_dir: str | Path):
    """The sweep's table as a pandas DataFrame, one row per job (read live from the job folders)."""
    import pandas as pd

    rows = collect(sweep_dir)
    df = pd.DataFrame(rows)
    if not len(df):
        return pd.DataFrame(columns=["job", "name", "status", "objective", *FINAL_METRICS, *TAIL])
    first = ["job", "name"]
    overrides = override_columns(df)
    overrides.sort(key=lambda c: df[c].astype(str).nunique() <= 1 < len(df))  # swept keys first, stable
    metrics = [c for m in (*FINAL_METRICS, *GEN_METRICS) for c in (m, m + SE) if c in df.columns]
    return df[[*first, *overrides, "status", "objective", *metrics, "heldout_rows", *TAIL]]


def ranked(df):
    """Best job first: finished jobs by the objective (higher is better); unfinished/failed last."""
    ok = df["status"] == "ok"
    key = objective_name(df)
    if key not in df:
        df = df.assign(**{key: None})
    return (df.assign(_ok=ok, _key=df[key].astype(float)).sort_values(["_ok", "_key"], ascending=False,
                                                                      na_position="last")
            .drop(columns=["_ok", "_key"]))


def verdict(df) -> str:
    """Which job is best, named only when it is separated from the runner-up by more than 2 combined standard
    errors (sqrt(se_1^2 + se_2^2)); else the jobs within noise of the best, and no winner."""
    import math

    key = objective_name(df)
    if key not in df:
        return f"No finished job has the objective {key}."
    ok = ranked(df)
    ok = ok[(ok["status"] == "ok") & ok[key].notna()]
    if not len(ok):
        return f"No finished job has the objective {key}."
    from dpo_lightning.sweeps.plots import _labels

    short = {job: text.split(": ", 1)[-1] for job, text in _labels(df).items()}  # what varies: ``ipo β=0.02``
    label = lambda r: f"job {r['job']} ({short.get(r['job']) or r['name'] or 'no overrides'})"  # noqa: E731
    se = lambda r: float(r.get(key + SE)) if r.get(key + SE) is not None and r.get(key + SE) == r.get(key + SE) else math.nan  # noqa: E731,E501
    best = ok.iloc[0]
    if len(ok) == 1:
        return f"One finished job: {label(best)}, {key} {_pm(best[key], se(best))}."
    second = ok.iloc[1]
    diff, both = float(best[key]) - float(second[key]), math.hypot(se(best), se(second))
    if both == both and diff > 2 * both:
        return (f"Best: {label(best)}, {key} {_pm(best[key], se(best))}; ahead of the runner-up {label(second)} "
                f"({_pm(second[key], se(second))}) by {diff:.3g} > 2 combined standard errors ({2 * both:.2g}).")
    tied = [r for _, r in ok.iloc[1:].iterrows()
            if not float(best[key]) - float(r[key]) > 2 * math.hypot(se(best), se(r))]
    names = " and ".join([label(best)] + [label(r) for r in tied[:2]])
    more = f" and {len(tied) - 2} more" if len(tied) > 2 else ""
    why = (f"{key} differs by {diff:.3g} <= 2 combined standard errors ({2 * both:.2g})" if both == both
           else "standard errors unknown")
    return f"No clear winner: {names}{more} within noise ({why})."


def _pm(value, se) -> str:
    """``0.917 ± 0.025`` (the standard error), or the value alone."""
    if value is None or value != value:
        return ""
    return f"{float(value):.4g} ± {se:.2g}" if se is not None and se == se else f"{float(value):.4g}"


def offline_runs(sweep_dir: str | Path) -> list[Path]:
    return sorted(Path(sweep_dir).glob("*/wandb/offline-run-*"))


def sync_command(sweep_dir: str | Path) -> str | None:
    """One ``wandb sync`` command that uploads every job's offline W&B run."""
    return f"wandb sync {Path(sweep_dir)}/*/wandb/offline-run-*" if offline_runs(sweep_dir) else None


OBJECTIVE_NOTE = {
    "val/pref_loglik": "held-out mean of log sigmoid(0.1 x implicit-reward margin against the initial policy), the "
                       "same fixed beta for every loss; -0.693 = the policy did not move; higher is better",
    "gen/win_rate": "the judge's win rate of the policy's samples over the reference's",
    "val/rewards/accuracies": "held-out reward accuracy: saturates, blind to how far the policy moved",
}


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def display_columns(df, drop: tuple[str, ...]) -> list[str]:
    """Columns worth showing: overrides that differ between jobs (constant ones are in every row alike);
    standard errors are shown beside their figure (``cell``), not as columns of their own."""
    constant = {c for c in override_columns(df) if df[c].astype(str).nunique() <= 1 and len(df) > 1}
    errors = "error" in df and df["error"].notna().any()
    return [c for c in df.columns if c not in constant and c not in drop and (c != "error" or errors)
            and not c.endswith(SE) and c != "objective" and (c not in df or df[c].notna().any() or c == "status")]


def cell(r, c: str) -> str:
    """A table cell: held-out figures as ``value ± standard error``."""
    if c + SE in r.index and r[c] is not None and r[c] == r[c]:
        se = r[c + SE]
        return _pm(r[c], float(se) if se is not None and se == se else None)
    return _fmt(r[c])


def markdown(df, sweep_dir: str | Path, plots: list[Path]) -> str:
    df = ranked(df)
    keep = display_columns(df, ("name", "loss_name", "beta", "lr", "val/logps/chosen"))
    n_ok = int((df["status"] == "ok").sum())
    passes = int(df["reference_passes"].fillna(0).sum()) if "reference_passes" in df else 0
    lines = [f"# Sweep report: {Path(sweep_dir).name}", "",
             f"{len(df)} jobs, {n_ok} finished, {len(df) - n_ok} failed or unfinished; reference passes: {passes}. "
             f"Objective: `{objective_name(df)}` (best first; {OBJECTIVE_NOTE.get(objective_name(df), '')}). "
             "Held-out figures are `mean ± standard error` over the held-out rows.", "", f"**{verdict(df)}**", ""]
    lines += ["| " + " | ".join(keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(cell(r, c).replace("|", "\\|") for c in keep) + " |" for _, r in df.iterrows()]
    cmd = sync_command(sweep_dir)
    if cmd:
        lines += ["", f"Upload the offline W&B runs: `{cmd}`"]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def print_rich(df, sweep_dir: str | Path) -> None:
    from rich.console import Console
    from rich.table import Table

    df = ranked(df)
    cols = display_columns(df, ("run_dir", "wandb_run_id", "loss_name", "beta", "lr", "name", "val/logps/chosen"))
    cols = [c for c in cols if c not in ("error", "heldout_rows")]  # errors: one whole line per failed job below
    short = {"val/pref_loglik": "val pref_loglik", "val/rewards/accuracies": "val acc",
             "val/rewards/margins": "val margin", "val/loss": "val loss", "val/logps/chosen": "val logp chosen",
             "wall_seconds": "wall s", "reference_passes": "ref passes"}
    table = Table(title=f"sweep {Path(sweep_dir).name}: best {objective_name(df)} first (± standard error)")
    for c in cols:
        table.add_column(short.get(c, c), overflow="fold")
    for _, r in df.iterrows():
        table.add_row(*[cell(r, c) for c in cols], style=None if r["status"] == "ok" else "red")
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and pipes: one line per job rather than 80-column wrapping
    console.print(table)
    print(verdict(df))


def write_report(sweep_dir: str | Path, *, plots: bool = True, print_table: bool = False):
    """Write ``sweep_report.csv``, ``sweep_report.md`` and the plots into the sweep folder; returns the table."""
    sweep_dir = Path(sweep_dir)
    df = load(sweep_dir)
    atomic_write_text(sweep_dir / "sweep_report.csv", df.to_csv(index=False))
    pngs: list[Path] = []
    if plots and len(df):
        from dpo_lightning.sweeps.plots import write_plots

        pngs = write_plots(df, sweep_dir)
    atomic_write_text(sweep_dir / "sweep_report.md", markdown(df, sweep_dir, pngs))
    if print_table and len(df):
        print_rich(df, sweep_dir)
        failed = df[df["status"] != "ok"]
        for _, r in failed.iterrows():
            print(f"job {r['job']} ({r['name']}): {r['status']} {_fmt(r.get('error'))} -> {r['run_dir']}")
        passes = int(df["reference_passes"].fillna(0).sum())
        print(f"sweep report: {sweep_dir / 'sweep_report.md'} (+ .csv, {len(pngs)} plots); "
              f"reference passes: {passes} for {len(df)} jobs")
        cmd = sync_command(sweep_dir)
        if cmd:
            print(f"W&B runs saved offline ({len(offline_runs(sweep_dir))}); upload them all with: {cmd}")
    return df
