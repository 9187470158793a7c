"""Column names and choices shared by the sweep report and its plots (no plotting, no reading of folders)."""

from __future__ import annotations

from dpo_lightning.sweeps.job import FINAL_METRICS, GEN_METRICS
from dpo_lightning.training.heldout import OBJECTIVE as HELDOUT_OBJECTIVE

OBJECTIVE = HELDOUT_OBJECTIVE  # the default ranking (sweep.objective=auto without a judge; training/heldout.py)
TAIL = ("steps", "wall_seconds", "reference_passes", "run_dir", "wandb_run_id", "loss_name", "beta", "lr", "error")
SE = "_se"  # suffix of a standard-error column: val/pref_loglik_se
# held-out figures and their standard errors (from the job summary's per-row statistics or the metric's _stderr)
WITH_SE = ("val/pref_loglik", "val/rewards/accuracies", "val/rewards/margins", "val/loss", "gen/kl", "gen/win_rate")


def override_columns(df) -> list[str]:
    skip = {"job", "name", "status", "objective", "heldout_rows", *FINAL_METRICS, *GEN_METRICS, *TAIL}
    return [c for c in df.columns if c not in skip and not c.endswith(SE)]


def objective_name(df) -> str:
    """The metric the jobs were ranked by (their summaries name it; ``sweep.objective``)."""
    names = df["objective"].dropna() if "objective" in df else []
    if len(names):
        return str(names.mode().iloc[0])
    has = lambda c: c in df and df[c].notna().any()  # noqa: E731
    return OBJECTIVE if has(OBJECTIVE) or not has("val/rewards/accuracies") else "val/rewards/accuracies"  # older
