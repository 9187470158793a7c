"""dpo-train: preference-optimize a causal LM with Lightning, configured by Hydra.

    dpo-train                                         # embedded default: tiny model, synthetic pairs, CPU
    dpo-train model=hf model.name_or_path=gpt2 data.path=pairs.jsonl loss=ipo loss.beta=0.1
    dpo-train -m loss.beta=0.05,0.5                   # a sweep: one run folder per job
    python -m dpo_lightning.train trainer.max_steps=50 logger=csv

``train(cfg)`` is a plain function (tests call it with a composed config); ``main`` is the thin Hydra edge.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from dpo_lightning.callbacks.resume import CheckpointError, resume_point
from dpo_lightning.cli.build import build
from dpo_lightning.cli.locate import config_dir
from dpo_lightning.cli.run_lock import RunFolderBusy, RunLock
from dpo_lightning.cli.runtime import (
    config_summary,
    find_error,
    flatten,
    prepare_wandb,
    print_config_tree,
    save_config,
    wandb_sync_hint,
)
from dpo_lightning.config.validate import ConfigError, validate_config
from dpo_lightning.data.formats import DataError
from dpo_lightning.export import export_policy
from dpo_lightning.files.atomic import WriteError
from dpo_lightning.models.hf import ModelLoadError
from dpo_lightning.sweeps.hydra_callback import register_plugins, sweep_failures, sweep_job_info
from dpo_lightning.sweeps.job import (
    JobInfo,
    apply_sweep_defaults,
    finish_globals,
    run_job,
    write_final_summary,
)
from dpo_lightning.training.memory import release_free_memory
from dpo_lightning.training.nonfinite import NonFiniteError

log = logging.getLogger("dpo_lightning")


def _metric(results: list[dict], key: str) -> float | None:
    return float(results[0][key]) if results and key in results[0] else None


def train(cfg: DictConfig, job: JobInfo | None = None) -> dict[str, Any]:
    """Run one training job; returns a summary (accuracies before/after, throughput, paths) and writes it to
    ``job_summary.json``. Whatever outlives the job in this process (the W&B run) is reset in a ``finally``."""
    failed, lock = True, RunLock(cfg.paths.output_dir)  # one live run per run folder (rank 0 / launcher)
    try:
        lock.acquire()
        summary = _train(cfg, job)
        failed = False
        return summary
    finally:
        lock.release()
        finish_globals(failed)


def _train(cfg: DictConfig, job: JobInfo | None) -> dict[str, Any]:
    start = time.perf_counter()
    validate_config(cfg)  # invalid combinations fail here, before any model loads
    L.seed_everything(cfg.seed, workers=True)
    notice = prepare_wandb(cfg.get("logger"))
    save_config(cfg, f"{cfg.paths.output_dir}/config.yaml")
    if cfg.get("print_config"):
        print_config_tree(cfg)
    else:  # one line; the whole config is in the run folder (or: print_config=true, dpo-train --cfg job)
        print(config_summary(cfg, f"{cfg.paths.output_dir}/config.yaml"))
    if notice:
        log.warning(notice)
    resume = resume_point(cfg.get("ckpt_path"), cfg.paths.output_dir)  # ckpt_path=last skips unreadable ones
    objs = build(cfg, resume=resume)
    module, dm, trainer = objs["module"], objs["datamodule"], objs["trainer"]
    for lg in objs["loggers"]:
        lg.log_hyperparams(flatten(OmegaConf.to_container(cfg, resolve=True)))

    dm.setup("fit")
    dm.release_tokenizer()  # the rows are tokenized; the export reloads it
    release_free_memory()
    has_val = bool(dm.val_rows)
    if resume is not None:  # a resumed run recorded its "before" validation already (the checkpoint has it)
        before = [resume.before] if resume.before else []
    else:
        before = trainer.validate(module, datamodule=dm, verbose=False) if has_val and cfg.get("eval_before") else []
    trainer.fit(module, datamodule=dm, ckpt_path=resume.path if resume else None)
    after = trainer.validate(module, datamodule=dm, verbose=False) if has_val else []

    summary: dict[str, Any] = {
        "val/rewards/accuracies (before)": _metric(before, "val/rewards/accuracies"),
        "val/rewards/accuracies (after)": _metric(after, "val/rewards/accuracies"),
        "val/loss (after)": _metric(after, "val/loss"),
        "steps": trainer.global_step,
        "val_pairs": len(dm.val_rows) if has_val and getattr(dm.val_rows, "paired", False) else None,
    }
    for cb in objs["callbacks"]:
        if hasattr(cb, "summary"):
            summary.update({f"train/{k}": v for k, v in cb.summary.items()})
        if getattr(cb, "path", None):
            summary["training_curves"] = str(cb.path)
        if getattr(cb, "best_model_path", None):
            summary["best_checkpoint"] = cb.best_model_path
            summary["last_checkpoint"] = cb.last_model_path
    if cfg.get("export"):  # every rank: sharded weights are gathered to rank 0, which writes
        out = export_policy(trainer, module, dm.processor or dm.tokenizer, f"{cfg.paths.output_dir}/export",
                            merge_adapters=bool(cfg.get("export_merged")))
        if out is not None:
            summary["export"] = str(out)
    if after:  # per-row values of the final validation: standard errors, the sweep objective (heldout.py)
        summary["heldout"], summary["heldout_rows"] = module.heldout.summary(), module.heldout.values()
    summary["wall_seconds"] = time.perf_counter() - start
    final = {k: float(v) for k, v in (after[0] if after else {}).items()}
    final.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("gen/")})
    for cb in objs["callbacks"]:  # the last generation evaluation (the validation after fit skips a repeat)
        final.update({k: float(v) for k, v in (getattr(cb, "last_metrics", None) or {}).items()
                      if k.startswith("gen/")})
    summary["final_metrics"] = final
    summary["reference_passes"] = int(any(not i["hit"] for i in module.reference.cache_infos))
    summary["wandb_run_id"] = next((lg.version for lg in objs["loggers"] if type(lg).__name__ == "WandbLogger"),
                                   None)
    hint = wandb_sync_hint(objs["loggers"])
    if trainer.is_global_zero:
        write_final_summary(cfg, summary, job)
        _print_summary(summary, hint if job is None else None)  # a sweep prints one sync command at its end
    return summary


def _print_summary(summary: dict[str, Any], hint: str | None) -> None:
    """The run's summary as plain ``key  value`` lines: paths are printed whole (no table cell to cut them)."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in summary.items()
            if not isinstance(v, dict) and k not in ("reference_passes", "wandb_run_id")]
    width = max((len(k) for k, _ in rows), default=0)
    print("dpo-train summary")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    before, after = summary.get("val/rewards/accuracies (before)"), summary.get("val/rewards/accuracies (after)")
    if after is not None:
        n = summary.get("val_pairs")

        def fmt(p):  # ± one binomial standard error over the held-out pairs
            return "n/a" if p is None else f"{p:.3f}" + (f" ± {(p * (1 - p) / n) ** 0.5:.3f}" if n else "")
        print(f"held-out reward accuracy: before {fmt(before)} -> after {fmt(after)}"
              + (f" ({n} held-out pairs; chance 0.5, a tie counts as wrong)" if n else ""))
    objective = summary.get("objective") or {}
    if objective.get("value") is not None:
        se = objective.get("stderr")
        print(f"sweep objective {objective['name']}: {objective['value']:.4f}"
              + (f" ± {se:.4f} (standard error)" if se is not None else "")
              + (" (log sigmoid(0) = -0.6931: the policy has not moved)" if objective["name"] == "val/pref_loglik"
                 else ""))
    if "train/tokens_per_sec" in summary:
        print(f"training throughput: {summary['train/tokens_per_sec']:.0f} tokens/s, "
              f"{summary['train/pairs_per_sec']:.1f} pairs/s")
    if hint:
        print(f"W&B run saved offline; upload it with: {hint}")


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    with open_dict(cfg):  # multirun: every job writes into its own folder
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    job = sweep_job_info(cfg)
    if job is not None:  # a multirun job: its own W&B run, failures recorded and the sweep goes on
        apply_sweep_defaults(cfg, job)
        summary = run_job(train, cfg, job)  # returns the sweep objective (sweep.objective) to the sweeper
        return None if summary is None else (summary.get("objective") or {}).get("value")
    summary = run_single(cfg)
    return (summary.get("objective") or {}).get("value")  # the sweep objective (sweep.objective)


# what a user can fix: one ``error: ...`` line and exit status 2, no traceback
USER_ERRORS = (DataError, ConfigError, FileNotFoundError, NonFiniteError, ModelLoadError, CheckpointError,
               RunFolderBusy, WriteError)


def run_single(cfg: DictConfig) -> dict[str, Any]:
    """``train(cfg)`` as the command line runs it: an error a user can fix (found also where Lightning or a
    callback raised another error from it) is one ``error: ...`` line on stderr and ``SystemExit(2)``."""
    try:
        return train(cfg)
    except Exception as err:
        known = find_error(err, USER_ERRORS)
        if known is None:
            raise
        print(f"error: {known}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    register_plugins()  # the Optuna sweeper, also from an editable install
    _hydra_main()
    if sweep_failures():  # multirun: the report lists the failed jobs; the exit code says so too
        raise SystemExit(1)


if __name__ == "__main__":
    main()
