"""Synthetic sweep folders (job summaries + training curves, as jobs leave them) to test the report and plots
without training: a grid of losses x betas, or a search with random-looking betas and learning rates."""

from __future__ import annotations

import math
import random
from pathlib import Path

from dpo_lightning.sweeps.job import JobInfo, write_summary

LOSSES = ("sigmoid", "ipo", "hinge", "simpo")
LOSS_SCALE = {"sigmoid": 0.7, "ipo": 20.0, "hinge": 1.0, "simpo": 3.0}  # IPO's loss is ~1/beta^2


def fake_job(root: Path, num: int, overrides: dict[str, str], *, loss: str, beta: float | None, lr: float,
             objective: float, se: float = 0.02, acc: float = 0.9, steps: int = 60, gen_kl: float | None = None,
             seed: int = 0, n: int = 120) -> Path:
    rng = random.Random(seed * 1000 + num)
    folder = root / str(num)
    name = ",".join(f"{k}={v}" for k, v in overrides.items())
    job = JobInfo(sweep=root.name, sweep_dir=str(root), num=num, overrides=overrides, name=name,
                  swept=sorted(overrides))
    heldout = {"val/pref_loglik": {"mean": objective, "stderr": se, "n": n},
               "val/rewards/accuracies": {"mean": acc, "stderr": math.sqrt(acc * (1 - acc) / n), "n": n},
               "val/rewards/margins": {"mean": 2.0 * (beta or 1), "stderr": 0.1, "n": n},
               "val/loss": {"mean": LOSS_SCALE[loss] * 0.6, "stderr": 0.03, "n": n}}
    metrics = {"val/rewards/accuracies": acc, "val/rewards/margins": 2.0 * (beta or 1),
               "val/loss": LOSS_SCALE[loss] * 0.6, "val/logps/chosen": -40.0, "val/pref_loglik": objective}
    if gen_kl is not None:
        metrics.update({"gen/kl": gen_kl, "gen/kl_stderr": gen_kl / 10})
    write_summary(folder, job, "ok", loss_name=loss, beta=beta, lr=lr, steps=steps, reference_passes=int(num == 0),
                  metrics=metrics, heldout=heldout, wall_seconds=30.0,
                  objective={"name": "val/pref_loglik", "value": objective, "stderr": se, "n": n})
    scale = LOSS_SCALE[loss]
    lines = ["metric,step,value"]
    for s in range(1, steps + 1):
        lines.append(f"train/loss,{s},{scale * (0.4 + 0.6 * math.exp(-s / 20)) * (1 + 0.2 * rng.uniform(-1, 1))}")
        lines.append(f"train/rewards/accuracies,{s},{min(1.0, 0.5 + 0.4 * s / steps + 0.1 * rng.uniform(-1, 1))}")
    for s in range(0, steps + 1, max(1, steps // 3)):
        lines.append(f"val/rewards/accuracies,{s},{0.5 + (acc - 0.5) * s / steps}")
        lines.append(f"val/pref_loglik,{s},{-0.693 + (objective + 0.693) * s / steps}")
    (folder / "training_curves.csv").write_text("\n".join(lines) + "\n")
    return folder


def fake_grid(root: Path, n_jobs: int, *, gen: bool = True) -> Path:
    """``n_jobs`` jobs of ``loss=...,loss.beta=...`` plus a constant-free extra key when the grid needs it."""
    betas = (0.01, 0.05, 0.1, 0.5, 1.0)
    num = 0
    for loss in LOSSES:
        for beta in betas:
            if num >= n_jobs:
                return root
            obj = -0.693 + 0.05 * (num % 7) + 0.01 * LOSSES.index(loss)
            fake_job(root, num, {"loss": loss, "loss.beta": str(beta), "optimizer.lr": "0.001"}, loss=loss,
                     beta=beta, lr=1e-3, objective=obj, acc=0.85 + 0.01 * (num % 10),
                     gen_kl=(0.5 + num) if gen else None)
            num += 1
    return root


def fake_search(root: Path, n_trials: int, seed: int = 0) -> Path:
    """An Optuna-like search: loss, beta (log-uniform, long floats), lr (log-uniform)."""
    rng = random.Random(seed)
    for num in range(n_trials):
        loss = rng.choice(LOSSES[:3])
        beta = 10 ** rng.uniform(-2, 0)
        lr = 10 ** rng.uniform(-7, -3)
        fake_job(root, num, {"loss": loss, "loss.beta": repr(beta), "optimizer.lr": repr(lr)}, loss=loss,
                 beta=beta, lr=lr, objective=-0.693 + 0.3 * rng.random(), gen_kl=rng.uniform(0, 5))
    return root
