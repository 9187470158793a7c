"""A small Hydra sweeper running an Optuna study (TPE by default) on stable Optuna 4+ and hydra-core 1.3.

    dpo-train hparams_search=optuna_beta                          # conf/hparams_search/optuna_beta.yaml
    dpo-train -m hydra/sweeper=dpo_optuna hydra.sweeper.n_trials=30 'loss.beta=tag(log, interval(0.01, 1))'

Why our own: the stable ``hydra-optuna-sweeper`` (1.2.0, 1.3.0) pins ``optuna<3``, and its Optuna-4 release is
a release candidate that needs the hydra-core 1.4 release candidate; neither installs beside our stable
dependencies. This one uses Optuna's ask-and-tell interface and Hydra's own override grammar, so search spaces
read as with that plugin: ``choice(a, b)``, ``interval(lo, hi)``, ``range(lo, hi, step)``, ``tag(log, ...)``,
from ``hydra.sweeper.params`` or the command line. Each trial is a job launched by the configured launcher
(basic, joblib, submitit), ``n_jobs`` at a time; its objective is the job's return value (``dpo-train`` returns
the sweep objective, ``sweep.objective``); a failed job (no value), or a trial whose overrides do not compose (``dpo_lightning/sweeps/compose.py``), is told
to Optuna as a failed trial. ``optuna`` is
imported only when a sweep starts, so Hydra's plugin scan works without it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def distribution(override: Override):
    """The Optuna distribution of one sweep override (``loss.beta=tag(log, interval(0.01, 1))``)."""
    import optuna.distributions as d

    value = override.value()
    log_scale = "log" in getattr(value, "tags", set())
    if isinstance(value, ChoiceSweep):
        return d.CategoricalDistribution([getattr(v, "text", v) for v in value.list])  # QuotedString -> str
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if all(isinstance(x, int) for x in (start, stop, step)):
            return d.IntDistribution(start, stop - 1, step=1 if log_scale else step, log=log_scale)
        return d.FloatDistribution(start, stop, step=None if log_scale else step, log=log_scale)
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int) and "float" not in value.tags:
            return d.IntDistribution(value.start, value.end, log=log_scale)
        return d.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"hydra.sweeper: {override.input_line!r} is not a search space; use choice(...), "
                     "interval(lo, hi), range(lo, hi[, step]), optionally inside tag(log, ...)")


class DpoOptunaSweeper(Sweeper):
    """Hydra sweeper: an Optuna study over ``params``, ``n_trials`` trials, ``n_jobs`` launched at a time."""

    def __init__(self, params: dict[str, str] | None = None, n_trials: int = 20, n_jobs: int = 1,
                 direction: str = "maximize", sampler: str = "tpe", seed: int | None = None,
                 n_startup_trials: int = 10, study_name: str | None = None, storage: str | None = None):
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"hydra.sweeper.direction={direction!r}: use maximize or minimize")
        if sampler not in ("tpe", "random"):
            raise ValueError(f"hydra.sweeper.sampler={sampler!r}: use tpe or random")
        if n_trials < 1 or n_jobs < 1:
            raise ValueError("hydra.sweeper.n_trials and hydra.sweeper.n_jobs must be >= 1")
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.n_trials, self.n_jobs, self.direction, self.sampler = n_trials, n_jobs, direction, sampler
        self.seed, self.n_startup_trials = seed, n_startup_trials
        self.study_name, self.storage = study_name, storage
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def _search_space(self, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
        parser = OverridesParser.create()
        fixed, space = [], {}
        for o in parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()]):
            space[o.get_key_element()] = distribution(o)
        for o in parser.parse_overrides(arguments):  # the command line wins over the config's params
            if o.is_sweep_override():
                space[o.get_key_element()] = distribution(o)
            else:
                space.pop(o.get_key_element(), None)
                fixed.append(o.input_line)
        if not space:
            raise ValueError("hydra.sweeper.params is empty: nothing to search (e.g. loss.beta: "
                             "tag(log, interval(0.01, 1.0)))")
        return space, fixed

    def sweep(self, arguments: list[str]) -> Any:
        import optuna
        from optuna.trial import TrialState

        from dpo_lightning.sweeps.compose import launch_composable

        assert self.config is not None and self.launcher is not None
        space, fixed = self._search_space(arguments)
        sampler = (optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.n_startup_trials)
                   if self.sampler == "tpe" else optuna.samplers.RandomSampler(seed=self.seed))
        study = optuna.create_study(direction=self.direction, sampler=sampler, study_name=self.study_name,
                                    storage=self.storage, load_if_exists=True)
        log.info("Optuna study %s (%s, %s): %d trials over %s", study.study_name, self.sampler, self.direction,
                 self.n_trials, ", ".join(f"{k}={v}" for k, v in self.params.items()) or "the command line")
        done = 0
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [[*fixed, *(f"{k}={_format(v)}" for k, v in t.params.items())] for t in trials]
            # a trial whose overrides do not compose is a failed job in the report and a failed trial here
            for trial, ret in zip(trials, launch_composable(self, batch, done)):
                if ret is None:
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                try:
                    value = ret.return_value  # raises the job's exception when it failed
                except Exception as err:  # noqa: BLE001 - a failed trial, recorded, the search goes on
                    log.warning("trial %d failed: %s", trial.number, err)
                    value = None
                if value is None or not math.isfinite(float(value)):
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    study.tell(trial, float(value))
            done += len(trials)
        return self._save_results(study)

    def _save_results(self, study) -> dict[str, Any] | None:
        from optuna.trial import TrialState

        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        results = {"name": "optuna", "direction": self.direction, "n_trials": len(study.trials),
                   "n_failed": sum(t.state == TrialState.FAIL for t in study.trials)}
        if complete:
            best = study.best_trial
            results.update(best_params=dict(best.params), best_value=best.value, best_trial=best.number)
            log.info("best trial %d: %s = %s", best.number, best.params, best.value)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        tmp = sweep_dir / ".optimization_results.yaml.tmp"
        OmegaConf.save(OmegaConf.create(results), tmp)
        tmp.replace(sweep_dir / "optimization_results.yaml")
        return results


def _format(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)
