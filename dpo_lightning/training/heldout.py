"""Per-row held-out values: standard errors for every held-out figure, and a sweep objective that does not saturate.

Held-out reward accuracy (the share of margins above 0) saturates and cannot tell a policy that moved from one
that did not: a run at lr 1e-7 whose margins are all 3e-5 scores as well as a trained one. Loss values and
reward margins are not comparable across losses (IPO's loss is ~1/beta^2, SimPO's rewards are per token) nor
across beta. So sweeps and searches rank by the **held-out preference log-likelihood**

    val/pref_loglik = mean over held-out pairs of  log sigmoid(BETA0 * [(log pi(y_w) - log pi_0(y_w))
                                                                        - (log pi(y_l) - log pi_0(y_l))])

with pi_0 the *initial* policy, log-probs summed over completion tokens, and one fixed BETA0 = 0.1 for every
loss and every beta of the sweep. It is the DPO loss's Bradley-Terry log-likelihood of the held-out
preferences, measured with the same yardstick for every job: it does not depend on the loss's own beta,
reward definition or length normalization; it is log sigmoid(0) = -0.693 for a policy that has not moved; it
rewards moving towards the preferred completions relative to the dispreferred ones on rows the run never
trained on, and it punishes a wrong-way move (an overfit policy) linearly rather than by one count. It
saturates only near margins of ~10/BETA0 = 100 nats per pair. pi_0's log-probs come from the validation
before training (``eval_before``, on by default); without one, from the reference where the reference is the
initial weights (copy, adapter, or precomputed from them); otherwise the measure is not available.

``HeldOutRecorder`` keeps, per held-out row of the last validation: the loss's own per-example loss, reward
margin and correctness (for standard errors of ``val/loss``, ``val/rewards/margins``,
``val/rewards/accuracies``) and the row's pref_loglik term. ``summary()`` gives mean, standard error and
count per figure; the job summary records them with the per-row values (``sweeps/job.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

BETA0 = 0.1  # the fixed beta of val/pref_loglik, the same for every loss and every beta of a sweep
OBJECTIVE = "val/pref_loglik"
ROW_METRICS = ("val/pref_loglik", "val/rewards/accuracies", "val/rewards/margins", "val/loss")


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); 0 for one value)."""
    n = len(values)
    if not n:
        return math.nan, math.nan
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


class HeldOutRecorder:
    """Collects per-row held-out values over one validation (module docstring)."""

    def __init__(self, beta0: float = BETA0):
        self.beta0 = beta0
        self.baseline: dict[int, tuple[float, float]] = {}  # row index -> initial policy's (chosen, rejected) sums
        self.rows: dict[int, dict[str, float]] = {}  # this validation's rows
        self.last: dict[int, dict[str, float]] = {}  # the last finished validation's rows
        self.baseline_source: str | None = None

    def start(self) -> None:
        self.rows = {}

    def observe(self, index: torch.Tensor, *, policy: torch.Tensor | None, reference: torch.Tensor | None,
                losses: torch.Tensor | None, margins: torch.Tensor | None) -> None:
        """One validation batch. ``policy`` / ``reference``: [B, 2] completion-token sums (chosen, rejected)
        of paired rows, or None; ``losses`` / ``margins``: [B] the loss's own per-example loss and reward
        margin (chosen minus rejected reward), or None."""
        idx = [int(i) for i in index.tolist()]
        cols: dict[str, list[float]] = {}
        for name, t in (("loss", losses), ("margin", margins)):
            if t is not None and t.numel() == len(idx):
                cols[name] = t.detach().float().cpu().tolist()
        for name, t in (("policy", policy), ("reference", reference)):
            if t is not None and t.shape[0] == len(idx):
                cols[name] = [tuple(r) for r in t.detach().double().cpu().tolist()]
        for j, i in enumerate(idx):
            self.rows[i] = {k: v[j] for k, v in cols.items()}

    def finish(self, *, untrained: bool, reference_is_initial: bool) -> None:
        """End of a validation: gather ranks' rows; an untrained policy's validation sets the baseline."""
        rows = _gather(self.rows)
        if untrained and not self.baseline_source:
            base = {i: r["policy"] for i, r in rows.items() if "policy" in r}
            if base:
                self.baseline, self.baseline_source = base, "the validation before training"
        for i, r in rows.items():
            pol = r.get("policy")
            base = self.baseline.get(i)
            if base is None and reference_is_initial and r.get("reference") is not None:
                base = r["reference"]
                self.baseline_source = self.baseline_source or "the reference (the initial weights)"
            if pol is not None and base is not None:
                m = (pol[0] - base[0]) - (pol[1] - base[1])
                r["pref_loglik"] = -_softplus(-self.beta0 * m)  # log sigmoid(beta0 * m)
        self.last, self.rows = rows, {}

    def values(self) -> dict[str, list[float]]:
        """Per-row values of the last validation, by figure, in row order."""
        order = sorted(self.last)
        get = lambda key: [self.last[i][key] for i in order if key in self.last[i]]  # noqa: E731
        out = {"val/pref_loglik": get("pref_loglik"), "val/rewards/margins": get("margin"), "val/loss": get("loss")}
        out["val/rewards/accuracies"] = [float(m > 0) for m in out["val/rewards/margins"]]
        return {k: v for k, v in out.items() if v}

    def summary(self) -> dict[str, dict[str, float]]:
        """{figure: {"mean", "stderr", "n"}} over the last validation's rows."""
        out = {}
        for key, vals in self.values().items():
            mean, se = mean_stderr(vals)
            out[key] = {"mean": mean, "stderr": se, "n": len(vals)}
        return out


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _gather(rows: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Every rank's rows on every rank (rows repeated by a distributed sampler's padding count once)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, rows)
        merged: dict[int, dict[str, Any]] = {}
        for part in parts:
            merged.update(part)
        return merged
    return dict(rows)
