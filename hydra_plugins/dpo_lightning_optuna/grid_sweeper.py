"""Hydra's grid sweeper, except that a grid point that does not compose is a failed job and the others run.

    dpo-train -m loss=sigmoid,ipo,simper loss.beta=0.1,0.5    # simper has no beta: its 2 jobs are recorded as
                                                              # failed ("loss=simper has no key 'beta'"), 4 run

The default sweeper (``conf/hydra/default.yaml``: ``override sweeper: dpo_grid``); ``hydra/sweeper=basic`` brings
back Hydra's own, which stops the whole sweep at the first such job. It lives in ``hydra_plugins`` because Hydra
instantiates sweepers from that package only; the work is ``dpo_lightning.sweeps.compose.launch_composable``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf


class DpoGridSweeper(BasicSweeper):
    """Hydra's basic (grid) sweeper, except that a grid point that does not compose is a failed job recorded in
    the report, and the other jobs run (module docstring)."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None) -> None:
        # BasicSweeper.__init__ is ``super(BasicSweeper, self).__init__()``: when Hydra's plugin scan re-runs
        # basic_sweeper after this module imported it (an editable install run from outside the checkout), that
        # name is a new class and the call fails. The same attributes, set here without it.
        Sweeper.__init__(self)
        self.overrides: Any = None
        self.batch_index = 0
        self.max_batch_size = max_batch_size
        self.params = params or {}
        self.hydra_context: Any = None
        self.config: Any = None
        self.launcher: Any = None

    def sweep(self, arguments: list[str]) -> Any:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from dpo_lightning.sweeps.compose import launch_composable

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        params = self._parse_config()
        params.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(parser.parse_overrides(params), self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, initial_job_idx = [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            results = launch_composable(self, batch, initial_job_idx)
            for r in results:
                if r is not None:
                    _ = r.return_value  # raises the job's own exception (dpo-train's jobs record theirs)
            initial_job_idx += len(batch)
            returns.append([r for r in results if r is not None])
        return returns
