"""training_curves.png/.csv: the validation run after fit is included; train values are smoothed."""

from __future__ import annotations

import lightning as L
import torch

from dpo_lightning import PreferenceDataModule, PreferenceLitModule, get_loss
from dpo_lightning.callbacks import TrainingCurves
from dpo_lightning.callbacks.curves import smooth


def test_smooth_is_a_debiased_moving_average():
    """weight 0.5: avg_1 = 0.5*1 / (1-0.5) = 1; avg_2 = (0.25 + 0.5*3) / (1-0.25) = 7/3."""
    assert smooth([1.0, 3.0], 0.5) == [1.0, 7 / 3]
    assert all(abs(v - 2.0) < 1e-12 for v in smooth([2.0] * 50))  # debiased: no warm-up from 0


def test_final_validation_after_fit_is_drawn(tiny_path, default_data_path, tmp_path):
    """No validation inside fit (the case where the picture showed only the step-0 point): the validation run
    after fit adds the held-out point at the last step, and the files are rewritten with it."""
    torch.set_num_threads(1)
    module = PreferenceLitModule(str(tiny_path), loss=get_loss("sigmoid", beta=0.1), optimizer={"lr": 1e-3})
    dm = PreferenceDataModule(default_data_path, str(tiny_path), batch_size=8, max_length=48, val_fraction=0.05,
                              cache_dir=str(tmp_path / "cache"))
    curves = TrainingCurves(dirpath=str(tmp_path))
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=2, num_sanity_val_steps=0,
                        callbacks=[curves])  # 4 steps of a ~70-batch epoch: no validation inside fit
    trainer.fit(module, datamodule=dm)
    assert "val/" not in (tmp_path / "training_curves.csv").read_text()
    trainer.validate(module, datamodule=dm, verbose=False)
    rows = (tmp_path / "training_curves.csv").read_text().splitlines()
    assert any(r.startswith("val/rewards/accuracies,4,") for r in rows)
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
