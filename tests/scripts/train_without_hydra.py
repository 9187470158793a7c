"""A user's plain Lightning script with hydra made unimportable: the module and data module train 4 steps and
validate. Usage: train_without_hydra.py TINY_MODEL_PATH DATA_PATH. Prints ``OK <steps> <val accuracy>``."""

import sys

sys.modules["hydra"] = None  # any `import hydra` now raises ImportError

import lightning as L  # noqa: E402

from dpo_lightning import PreferenceDataModule, PreferenceLitModule, get_loss  # noqa: E402

tiny, data = sys.argv[1:3]
m = PreferenceLitModule(tiny, loss=get_loss("sigmoid", beta=0.1), optimizer={"lr": 1e-3})
dm = PreferenceDataModule(data, tiny, batch_size=8, max_length=64, val_fraction=0.1)
t = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=2)
t.fit(m, datamodule=dm)
val = t.validate(m, datamodule=dm, verbose=False)[0]
assert sys.modules["hydra"] is None
print("OK", t.global_step, val["val/rewards/accuracies"])
