"""Run folders written before the move to subpackages still resume: their ``config.yaml`` names
``dpo_lightning.optim.*`` (and ``dpo_lightning.strategies.*`` for FSDP/DeepSpeed runs); the forwarding modules keep
those Hydra targets working. A tiny run trains with checkpoints, its saved config is rewritten to the old names,
and ``dpo-train --config-path <run> --config-name config ckpt_path=last`` resumes it from that config to the end."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml
from hydra.utils import get_class

from dpo_lightning.cli.locate import compose

OLD = {"dpo_lightning.training.optim.OptimizerSpec": "dpo_lightning.optim.OptimizerSpec",
       "dpo_lightning.training.optim.SchedulerSpec": "dpo_lightning.optim.SchedulerSpec",
       "dpo_lightning.training.strategies.": "dpo_lightning.strategies."}
FAST = ["logger=none", "generation=none", "eval_before=false", "export=false", "print_config=false",
        "trainer.accelerator=cpu", "trainer.max_steps=3", "trainer.val_check_interval=3", "data.max_length=32",
        "data.batch_size=8", "callbacks.progress_bar=null", "callbacks.training_curves=null"]


def test_old_strategy_targets_resolve_to_the_new_classes():
    from dpo_lightning.training import strategies

    for name in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"):
        assert get_class(f"dpo_lightning.strategies.{name}") is getattr(strategies, name)


@pytest.mark.subprocess
def test_run_folder_with_old_targets_resumes(tmp_path, one_thread):
    from dpo_lightning.train import train

    run = tmp_path / "run"
    summary = train(compose("train", [*FAST, f"paths.output_dir={run}"]))
    assert summary["steps"] == 3 and (run / "checkpoints" / "last.ckpt").exists()

    text = (run / "config.yaml").read_text()
    for new, old in OLD.items():
        text = text.replace(new, old)
    assert "dpo_lightning.optim.OptimizerSpec" in text and "dpo_lightning.optim.SchedulerSpec" in text
    assert "dpo_lightning.training." not in text  # no new-style target left (the default run has no strategy target)
    (run / "config.yaml").write_text(text)

    res = subprocess.run([sys.executable, "-m", "dpo_lightning.train", "--config-path", str(run), "--config-name",
                          "config", f"hydra.run.dir={run}", "ckpt_path=last", "trainer.max_steps=5"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"resuming from {run}/checkpoints/last.ckpt" in res.stdout
    assert re.search(r"^\s+steps\s+5$", res.stdout, re.M), res.stdout[-2000:]  # the summary line
    saved = yaml.safe_load((run / "config.yaml").read_text())  # the resumed run saved its config again
    assert saved["optimizer"]["_target_"] == "dpo_lightning.optim.OptimizerSpec"
