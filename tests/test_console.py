"""What `make run` prints: no packaging warnings, no config tree unless asked, whole paths, a step progress bar."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from dpo_lightning.callbacks.progress import StepProgressBar, counts_steps

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.subprocess
def test_building_the_package_prints_no_setuptools_warnings(tmp_path):
    """The license table (deprecated) and conf/<group>/ folders seen as unlisted packages printed ~900 lines
    of BuildBackendWarning on every `pip install -e .` (`make setup`)."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                          str(REPO), "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "BuildBackendWarning" not in text, text[-3000:]
    assert "is absent from the `packages` configuration" not in text
    assert "SetuptoolsDeprecationWarning" not in text


def test_config_tree_only_on_request_and_a_one_line_summary_instead():
    from dpo_lightning.cli.locate import compose
    from dpo_lightning.cli.runtime import config_summary

    cfg = compose("train", ["paths.output_dir=/tmp/x"])
    assert cfg.print_config is False
    line = config_summary(cfg, "/tmp/x/config.yaml")
    assert "\n" not in line and "loss sigmoid (beta 0.1)" in line and "/tmp/x/config.yaml" in line


def test_run_summary_prints_paths_whole(capsys, monkeypatch):
    from dpo_lightning.train import _print_summary

    monkeypatch.setenv("COLUMNS", "80")
    long = "/very/long/output/folder/" + "x" * 120 + "/checkpoints/best-step40.ckpt"
    _print_summary({"steps": 40, "best_checkpoint": long, "wall_seconds": 1.5,
                    "val/rewards/accuracies (after)": 0.9}, None)
    out = capsys.readouterr().out
    assert any(line.split() == ["best_checkpoint", long] for line in out.splitlines()), out
    assert "…" not in out


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(8, 2))
        return torch.utils.data.DataLoader(data, batch_size=2)  # 4 steps an epoch


def test_step_bounded_run_shows_one_step_bar_not_epoch_minus_two(tmp_path):
    bar = StepProgressBar(leave=True)
    trainer = L.Trainer(max_steps=10, max_epochs=-1, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    assert counts_steps(trainer)
    trainer.fit(_Tiny())
    descriptions = [t.description for t in bar.progress.tasks]
    train = [d for d in descriptions if "Step" in d]
    assert len(train) == 1, descriptions  # one bar across three epochs
    assert "Step 10/10" in train[0] and not any("-2" in d for d in descriptions), descriptions
    assert bar.progress.tasks[0].completed == 10


def test_epoch_bounded_run_keeps_lightnings_bar(tmp_path):
    trainer = L.Trainer(max_epochs=2, callbacks=[StepProgressBar()], logger=False, accelerator="cpu")
    assert not counts_steps(trainer)
