"""Grid points that do not compose: a failed job in the report, not the end of the sweep.

Hydra composes every job of a batch before launching it (``Sweeper.validate_batch_is_legal``) and stops the
whole multirun at the first one that does not compose: ``dpo-train -m loss=sigmoid,ipo,simper
loss.beta=0.1,0.5`` ran no job at all, because SimPER has no ``beta``. Our sweepers (``hydra_plugins/dpo_lightning_optuna``: the
grid sweeper, the default, and the Optuna sweeper) launch through ``launch_composable`` instead: a job whose overrides do not compose gets its
folder and a ``failed`` ``job_summary.json`` whose error names the group choice and the key (``loss=simper has
no key 'beta'``), and every other job runs.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dpo_lightning.sweeps.job import STATE, JobInfo, parse_overrides, write_summary

log = logging.getLogger("dpo_lightning")


def compose_error(err: BaseException, overrides: Sequence[str], config) -> str:
    """One line naming what does not compose: ``loss=simper has no key 'beta' (loss.beta=0.1)``."""
    texts = []
    e: BaseException | None = err
    while e is not None and len(texts) < 5:
        texts.append(str(e))
        e = e.__cause__ or e.__context__
    text = "\n".join(texts)
    match = re.search(r"Could not override '([^']+)'", text)
    if not match:
        first = next((t.strip().splitlines()[0] for t in texts if t.strip()), type(err).__name__)
        return f"the job's overrides do not compose: {first}"
    key = match.group(1)
    group, _, leaf = key.rpartition(".")
    given = parse_overrides(list(overrides))
    if group:
        choice = given.get(group) or OmegaConf.select(config, f"hydra.runtime.choices.{group}", default=None)
        owner = f"{group}={choice}" if choice else group
        value = given.get(key, "")
        why = f"Key {leaf!r} is not in struct" if "not in struct" in text else texts[-1].strip().splitlines()[0]
        return f"{owner} has no key '{leaf}' ({key}={value} does not compose: {why}; sweep {owner} without {key})"
    return f"'{key}' is not a key of the config ({texts[0].splitlines()[0]})"


def _job_info(config, overrides: Sequence[str], num: int) -> JobInfo:
    from dpo_lightning.sweeps.hydra_callback import _constant_keys

    sweep_dir = Path(str(config.hydra.sweep.dir))
    constant = _constant_keys(sweep_dir)
    task = list(overrides)
    varying = [t for t in task if t.partition("=")[0].lstrip("+~") not in constant] or task
    return JobInfo(sweep=str(OmegaConf.select(config, "sweep_id", default=None) or sweep_dir.name),
                   sweep_dir=str(sweep_dir), num=num, overrides=parse_overrides(task), name=",".join(varying),
                   swept=sorted(parse_overrides(varying)))


def record_uncomposable(config, overrides: Sequence[str], num: int, error: str) -> Path:
    """Write the failed ``job_summary.json`` of job ``num`` into ``<sweep dir>/<num>/``."""
    job = _job_info(config, overrides, num)
    folder = Path(job.sweep_dir) / str(num)
    STATE["failed"] += 1
    print(f"error: sweep job {num} ({job.name or 'no overrides'}) not run: {error}; the sweep goes on",
          file=sys.stderr)
    given = job.overrides
    return write_summary(folder, job, "failed", error=error, loss_name=given.get("loss"),
                         beta=given.get("loss.beta"), lr=given.get("optimizer.lr"))


def launch_composable(sweeper, batch: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """Launch the jobs of ``batch`` that compose, numbered as in the batch; record the others as failed.
    Returns one entry per job: the launcher's ``JobReturn``, or None for a job that did not compose."""
    loader, config = sweeper.hydra_context.config_loader, sweeper.config
    results: list[Any] = [None] * len(batch)
    runnable: list[int] = []
    for i, overrides in enumerate(batch):
        try:
            loader.load_sweep_config(master_config=config, sweep_overrides=list(overrides))
            runnable.append(i)
        except Exception as err:  # noqa: BLE001 - Hydra's composition errors come in several types
            record_uncomposable(config, overrides, initial_job_idx + i, compose_error(err, overrides, config))
    start = 0
    while start < len(runnable):  # launch each run of consecutive composable jobs with its own job numbers
        end = start
        while end + 1 < len(runnable) and runnable[end + 1] == runnable[end] + 1:
            end += 1
        first = runnable[start]
        returns = sweeper.launcher.launch([batch[i] for i in runnable[start:end + 1]],
                                          initial_job_idx=initial_job_idx + first)
        for j, ret in enumerate(returns):
            results[first + j] = ret
        start = end + 1
    return results
