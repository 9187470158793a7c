"""Plugging into a user's own Lightning project, without Hydra: the data module learns paired / kl_pairs from the
module it is trained with (KTO without `paired=` trains), and Lightning's "module(s) in eval mode" warning about
the frozen reference is not shown, while a user's own eval-mode module still gets it."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from helpers import run_script

from dpo_lightning import PreferenceDataModule, PreferenceLitModule, get_loss


@pytest.fixture(scope="module")
def user_scripts(tiny_path, default_data_path, tmp_path_factory):
    """tests/scripts/train_without_hydra.py, then user_lightning_kto.py, in one process (one interpreter start)."""
    out = tmp_path_factory.mktemp("user")
    return run_script("run_in_one_process.py", "train_without_hydra.py", str(tiny_path), default_data_path, "--",
                      "user_lightning_kto.py", str(tiny_path), default_data_path, str(out), timeout=400)


@pytest.mark.subprocess
def test_plain_lightning_without_hydra(user_scripts):
    """The module and data module train with a plain lightning.Trainer while hydra cannot be imported."""
    assert user_scripts.returncode == 0, user_scripts.stderr[-3000:]
    assert "\nOK 4 " in "\n" + user_scripts.stdout


@pytest.mark.subprocess
def test_plain_script_with_own_callback_and_logger_kto_without_paired(user_scripts):
    """A user's own Lightning script, own callback and CSV logger, no Hydra, KTO without ``paired=``."""
    assert user_scripts.returncode == 0, user_scripts.stderr[-3000:]
    assert "\nOK 3 12 " in user_scripts.stdout  # 3 steps x 4 rows, all through the user's callback
    assert "in eval mode" not in user_scripts.stderr


def _fit_one_step(module, data, tiny):
    dm = PreferenceDataModule(data, tiny, batch_size=2, max_length=24)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # pytest's own filter for this message is overridden here
        trainer.fit(module, datamodule=dm)
    return [str(w.message) for w in caught if "in eval mode" in str(w.message)], dm


def test_eval_mode_warning_only_for_the_users_own_modules(tiny_path, default_data_path):
    torch.manual_seed(0)
    module = PreferenceLitModule(str(tiny_path), loss=get_loss("sigmoid", beta=0.1))
    shown, dm = _fit_one_step(module, default_data_path, str(tiny_path))
    assert shown == [] and dm.paired is True and dm.kl_pairs is False
    module = PreferenceLitModule(str(tiny_path), loss=get_loss("sigmoid", beta=0.1))
    module.probe = torch.nn.Linear(2, 2).eval()  # the user's own module, left in eval mode
    shown, _ = _fit_one_step(module, default_data_path, str(tiny_path))
    assert len(shown) == 1 and "Found" in shown[0]


def test_explicit_paired_that_contradicts_the_loss_is_refused(tiny_path, default_data_path):
    module = PreferenceLitModule(str(tiny_path), loss=get_loss("kto", beta=0.1))
    dm = PreferenceDataModule(default_data_path, str(tiny_path), batch_size=2, max_length=24, paired=True)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"paired=True\) does not fit loss 'kto'"):
        trainer.fit(module, datamodule=dm)
