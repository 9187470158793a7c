"""A regular (non-editable) install carries the Hydra configs and the embedded dataset."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import SCRIPTS

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.subprocess  # pip wheel, then Python on the unpacked wheel


def test_wheel_carries_configs_and_runs_from_site_packages(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            str(REPO), "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(tmp_path.glob("dpo_lightning-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("dpo_lightning/conf/train.yaml", "dpo_lightning/conf/eval.yaml", "dpo_lightning/conf/loss/sigmoid.yaml",
              "dpo_lightning/conf/model/tiny.yaml", "dpo_lightning/assets/default_prefs.jsonl",
              "dpo_lightning/conf/hparams_search/optuna_beta.yaml", "dpo_lightning/conf/hydra/sweeper/dpo_optuna.yaml",
              "hydra_plugins/dpo_lightning_optuna/optuna_sweeper.py", "dpo_lightning/sweeps/report.py"):
        assert f in names, f
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = subprocess.run([sys.executable, str(SCRIPTS / "installed_package.py")], capture_output=True, text=True,
                         timeout=120,
                         cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["sigmoid", "800"]
