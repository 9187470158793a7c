"""The Hydra edge of sweeps: who the current job is, and the report at the end of every multirun.

``SweepReport`` is a Hydra callback (``conf/hydra/default.yaml``: ``hydra.callbacks.sweep_report``), so it runs
with any launcher (basic, joblib, submitit/SLURM) and any sweeper (grid, our Optuna sweeper): at the end of the
multirun it reads the job folders and writes the report (``dpo_lightning.sweeps.report``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dpo_lightning.sweeps.job import STATE, JobInfo, parse_overrides

log = logging.getLogger("dpo_lightning")


def _constant_keys(sweep_dir: Path) -> set[str]:
    """Keys the sweep's command line sets to one value for every job (``multirun.yaml`` holds it:
    ``loss=sigmoid,ipo`` is swept, ``trainer.max_steps=5`` is constant). Keys a search sweeper adds are not
    on that command line, so they count as varying."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        task = [str(t) for t in OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task]
        parsed = OverridesParser.create().parse_overrides(task)
    except Exception:  # noqa: BLE001 - no multirun.yaml: every override names the job
        return set()
    return {o.key_or_group for o in parsed if not o.is_sweep_override()}


def sweep_job_info(cfg: DictConfig) -> JobInfo | None:
    """The current job's ``JobInfo`` in a multirun, None in a single run (or outside Hydra)."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(hc.sweep.dir)
    task = [str(t) for t in hc.overrides.task]
    constant = _constant_keys(sweep_dir)
    varying = [t for t in task if t.partition("=")[0].lstrip("+~") not in constant] or task
    return JobInfo(sweep=str(cfg.get("sweep_id") or sweep_dir.name), sweep_dir=str(sweep_dir),
                   num=int(hc.job.num), overrides=parse_overrides(task), name=",".join(varying),
                   swept=sorted(parse_overrides(varying)))


def register_plugins() -> None:
    """Register our Hydra plugins (the grid and Optuna sweepers) explicitly. Hydra finds plugins by walking the
    ``hydra_plugins`` namespace with pkgutil, which cannot see into a setuptools editable install
    (``pip install -e``); a regular install is found either way. Importing the module does not import optuna."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.dpo_lightning_optuna.grid_sweeper import DpoGridSweeper
    from hydra_plugins.dpo_lightning_optuna.optuna_sweeper import DpoOptunaSweeper

    plugins = Plugins.instance()
    for cls in (DpoGridSweeper, DpoOptunaSweeper):
        if f"{cls.__module__}.{cls.__name__}" not in plugins.class_name_to_class:
            plugins.register(cls)


def sweep_failures() -> int:
    """Failed jobs of the sweep this process ran (in-process jobs, or as the report counted them)."""
    return int(STATE["failed"])


class SweepReport(Callback):
    """Write ``sweep_report.csv`` / ``.md`` / plots into the sweep folder at the end of every multirun, print
    the results table and one ``wandb sync`` command for all offline runs."""

    def __init__(self, plots: bool = True, print_table: bool = True):
        self.plots, self.print_table = plots, print_table

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        STATE["failed"] = 0

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from dpo_lightning.sweeps.report import write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            table = write_report(sweep_dir, plots=self.plots, print_table=self.print_table)
        except Exception as err:  # noqa: BLE001 - a report problem must not hide the jobs' own results
            log.error("sweep report failed: %s (rebuild it with: dpo-sweep-report %s)", err, sweep_dir)
            return
        failed = int((table["status"] != "ok").sum()) if len(table) else 0
        STATE["failed"] = max(STATE["failed"], failed)
