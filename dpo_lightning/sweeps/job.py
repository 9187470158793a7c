"""One job of a sweep: its identity, its defaults, its summary file, and what is reset between jobs.

A sweep (``dpo-train -m ...``) runs many jobs, often in one process (Hydra's basic launcher). Everything global
(the W&B run, seeds, caches, CUDA memory) is reset after each job in a ``finally``; a failed job is recorded in
its folder and the sweep goes on. Each job leaves ``job_summary.json`` in its folder (written atomically, first
with status ``running``, then ``ok`` or ``failed``): ``dpo_lightning.sweeps.report`` reads nothing else.
No Hydra here: ``train.py`` / the Hydra callback pass the job's identity in as a plain ``JobInfo``.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from dpo_lightning.files.atomic import atomic_write_json
from dpo_lightning.training.heldout import OBJECTIVE as HELDOUT_OBJECTIVE

log = logging.getLogger("dpo_lightning")
SUMMARY_FILE = "job_summary.json"
FINAL_METRICS = ("val/pref_loglik", "val/rewards/accuracies", "val/rewards/margins", "val/loss", "val/logps/chosen")
GEN_METRICS = ("gen/kl", "gen/kl_stderr", "gen/win_rate", "gen/win_rate_stderr", "gen/reward")  # generation callback
OBJECTIVES = ("auto", HELDOUT_OBJECTIVE, "gen/win_rate", "val/rewards/accuracies")  # sweep.objective
STATE = {"failed": 0}  # failed jobs of this process's sweep (main() turns a non-zero count into exit code 1)


@dataclass
class JobInfo:
    """Who a job is within its sweep. ``overrides``: the job's own command-line overrides (key -> value)."""

    sweep: str  # the W&B group: a sweep_id, or the sweep folder's name
    sweep_dir: str
    num: int
    overrides: dict[str, str] = field(default_factory=dict)
    name: str = ""  # "loss=ipo,loss.beta=0.5": the overrides that differ between the sweep's jobs
    swept: list[str] = field(default_factory=list)  # their keys


def parse_overrides(items: list[str]) -> dict[str, str]:
    """["loss=ipo", "+trainer.x=1"] -> {"loss": "ipo", "trainer.x": "1"} (Hydra's +/++/~ prefixes dropped)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.lstrip("+~")] = value
    return out


ALIASES = {"loss": "", "loss.beta": "β", "optimizer.lr": "lr"}  # short names of swept keys


def short_value(v) -> str:
    """``0.02051080282348`` -> ``0.0205``; ``1e-3`` -> ``0.001``; text unchanged."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if f != f or isinstance(v, bool):
        return str(v)
    return f"{f:.3g}"


def short_label(overrides: dict[str, str], keys: list[str] | None = None) -> str:
    """A job's short name from its swept overrides: ``ipo β=0.1 lr=1e-06`` (W&B run names, legends)."""
    parts = []
    for k in keys if keys is not None else list(overrides):
        if k not in overrides:
            continue
        alias = ALIASES.get(k, k.rsplit(".", 1)[-1])
        value = short_value(overrides[k])
        parts.append(value if not alias else f"{alias}={value}")
    return " ".join(parts)


def summary_path(folder: str | Path) -> Path:
    return Path(folder) / SUMMARY_FILE


def write_summary(folder: str | Path, job: JobInfo | None, status: str, **fields: Any) -> Path:
    """Write ``<folder>/job_summary.json`` atomically (a reader never sees half a file)."""
    data = {"status": status, "run_dir": str(folder), "time": time.time(), **fields}
    if job is not None:
        data.update(job=asdict(job))
    return atomic_write_json(summary_path(folder), data)


def precompute_is_exact(cfg: DictConfig) -> tuple[bool, str]:
    """Whether precomputed reference log-probs equal the live reference's for this config, and why not.

    Exact (within the tested 1e-5 of reference_cache) when the reference is frozen and fixed for the whole run,
    the loss reads per-row reference sums (not KTO's batch-dependent KL rows), the weights are fp32
    (``32-true``: under mixed/bf16 precision the live reference runs in lower precision than the precompute),
    the strategy does not shard the model, and the engine is not on its plain full-logits path.
    """
    from hydra.utils import instantiate

    from dpo_lightning.reference.spec import AUTO, Mode
    from dpo_lightning.training.strategies import strategy_kind

    loss = instantiate(cfg.loss, _convert_="all")
    if not loss.requires_reference:
        return False, f"loss {loss.name} needs no reference"
    if loss.needs_kl_pairs:
        return False, f"loss {loss.name}'s KL rows depend on the batching"
    if str(OmegaConf.select(cfg, "reference.mode", default=AUTO)) == Mode.NONE:
        return False, "reference.mode=none"
    if str(OmegaConf.select(cfg, "trainer.precision", default="32-true")) not in ("32-true", "32"):
        return False, "trainer.precision is not 32-true"
    if strategy_kind(cfg.get("strategy")) not in ("auto", "ddp"):
        return False, "a sharded strategy"
    if OmegaConf.select(cfg, "engine.full_logits", default=False):
        return False, "engine.full_logits=true (the plain path)"
    if int(OmegaConf.select(cfg, "reference.sync.every_n_steps", default=0) or 0) > 0:  # TR-DPO
        return False, "the reference moves during training (reference sync)"
    return True, "exact"


def apply_sweep_defaults(cfg: DictConfig, job: JobInfo) -> None:
    """Per-job defaults of a multirun: W&B group/name/tags, and ``reference.precompute`` on where exact."""
    with open_dict(cfg):
        wandb = (cfg.get("logger") or {}).get("wandb")
        if wandb:
            wandb.group = wandb.get("group") or cfg.get("sweep_id") or job.sweep
            # short: "3: ipo β=0.1 lr=1e-06" (the swept values), not the full override string
            wandb.name = wandb.get("name") or f"{job.num}: {short_label(job.overrides, job.swept) or 'job'}"
            loss_name = OmegaConf.select(cfg, "loss.name", default=None)
            tags = list(wandb.get("tags") or [])
            wandb.tags = tags + [loss_name] if loss_name and loss_name not in tags else tags
        if cfg.get("reference") is not None and cfg.reference.get("precompute") is None:
            try:
                exact, why = precompute_is_exact(cfg)
            except Exception:  # noqa: BLE001 - a broken loss config fails later with its own message
                exact, why = False, "the loss does not build"
            cfg.reference.precompute = exact
            log.info("multirun: reference.precompute=%s (%s)%s", exact, why,
                     "; one reference pass serves every job on the same model and data" if exact else "")


def finish_globals(failed: bool) -> None:
    """Reset what outlives a job in this process: the W&B run (else the next job logs into it), memory."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            try:
                wandb.finish(exit_code=1 if failed else 0)
            except Exception as err:  # noqa: BLE001 - never let cleanup hide the job's own result
                log.warning("wandb.finish failed: %s", err)
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def resolve_objective(cfg: DictConfig) -> str:
    """The metric sweeps and searches rank by (``sweep.objective``; ``training/heldout.py`` says why not
    held-out reward accuracy): ``auto`` is the judge's win rate where generation evaluation has a judge, else
    the held-out preference log-likelihood at a fixed beta."""
    name = str(OmegaConf.select(cfg, "sweep.objective", default="auto") or "auto")
    if name == "auto":
        judged = (OmegaConf.select(cfg, "generation.judge", default=None)
                  and int(OmegaConf.select(cfg, "generation.num_prompts", default=0) or 0) > 0
                  and OmegaConf.select(cfg, "callbacks.generation", default=None))
        return "gen/win_rate" if judged else HELDOUT_OBJECTIVE
    if name not in OBJECTIVES:
        raise ValueError(f"sweep.objective={name!r}: use one of {', '.join(OBJECTIVES)}")
    return name


def objective_of(name: str, metrics: dict[str, Any], heldout: dict[str, dict[str, float]]) -> dict[str, Any]:
    """{"name", "value", "stderr"} of objective ``name`` from a run's final metrics and per-row statistics."""
    if name in heldout:
        return {"name": name, "value": heldout[name]["mean"], "stderr": heldout[name]["stderr"],
                "n": heldout[name]["n"]}
    return {"name": name, "value": metrics.get(name), "stderr": metrics.get(f"{name}_stderr")}


def write_final_summary(cfg: DictConfig, summary: dict[str, Any], job: JobInfo | None) -> Path:
    """The ``ok`` summary of a finished run: final held-out (and generation) metrics with standard errors and
    per-row values, the objective, steps, time, W&B id. Sets ``summary["objective"]``."""
    metrics = summary.get("final_metrics") or {}
    heldout = summary.get("heldout") or {}
    summary["objective"] = objective_of(resolve_objective(cfg), metrics, heldout)
    return write_summary(
        cfg.paths.output_dir, job, "ok",
        metrics={k: metrics[k] for k in (*FINAL_METRICS, *GEN_METRICS) if k in metrics},
        heldout=heldout, heldout_rows=summary.get("heldout_rows") or {}, objective=summary["objective"],
        all_metrics=metrics, steps=summary.get("steps"), wall_seconds=summary.get("wall_seconds"),
        reference_passes=summary.get("reference_passes", 0), wandb_run_id=summary.get("wandb_run_id"),
        loss_name=OmegaConf.select(cfg, "loss.name", default=None),
        beta=OmegaConf.select(cfg, "loss.beta", default=None),
        lr=OmegaConf.select(cfg, "optimizer.lr", default=None))


def error_line(err: BaseException) -> str:
    """One line naming the root cause (Hydra wraps a constructor's error in an InstantiationException)."""
    root = err
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[0] if text else ''}".strip()


def run_job(train_fn, cfg: DictConfig, job: JobInfo) -> dict[str, Any] | None:
    """Run one sweep job: summary ``running`` -> ``ok`` / ``failed``. A failure is logged with its traceback,
    recorded and swallowed (returns None) so the sweep goes on; Ctrl-C still stops the sweep."""
    folder = cfg.paths.output_dir
    write_summary(folder, job, "running", started=time.time())
    try:
        return train_fn(cfg, job=job)  # train() writes the "ok" summary itself (write_final_summary)
    except KeyboardInterrupt:
        write_summary(folder, job, "interrupted")
        raise
    except (Exception, SystemExit) as err:
        STATE["failed"] += 1
        log.error("job %d (%s) failed:\n%s", job.num, job.name, traceback.format_exc())
        print(f"error: sweep job {job.num} ({job.name or 'no overrides'}) failed: {error_line(err)}; "
              f"the sweep goes on (details: {folder})", file=sys.stderr)
        write_summary(folder, job, "failed", error=error_line(err))
        return None
