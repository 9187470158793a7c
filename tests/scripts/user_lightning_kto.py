"""A user's own Lightning script (no Hydra, all warnings shown): KTO without ``paired=``, the user's own callback
and CSV logger, 3 steps of 4 rows. Usage: user_lightning_kto.py TINY_MODEL_PATH DATA_PATH OUT_DIR.
Prints ``OK <steps> <rows seen by the callback> <val loss>``."""

import csv
import sys
import warnings

sys.modules["hydra"] = None  # any `import hydra` raises ImportError: nothing here may need it
warnings.simplefilter("default")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from dpo_lightning import PreferenceDataModule, PreferenceLitModule, get_loss  # noqa: E402

tiny, data, out = sys.argv[1:4]


class CountRows(L.Callback):  # the user's own callback
    rows = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        CountRows.rows += batch["index"].numel()
        assert batch["num_sequences"] == 2 * batch["index"].numel()  # KTO's KL rows are in the batch


torch.manual_seed(0)
module = PreferenceLitModule(tiny, loss=get_loss("kto", beta=0.1), optimizer={"lr": 1e-3})
dm = PreferenceDataModule(data, tiny, batch_size=4, max_length=32, val_fraction=0.1)  # no paired=
trainer = L.Trainer(max_steps=3, logger=CSVLogger(out, name="mine"), callbacks=[CountRows()],
                    enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=2, log_every_n_steps=1)
trainer.fit(module, datamodule=dm)
val = trainer.validate(module, datamodule=dm, verbose=False)[0]
assert dm.paired is False and dm.kl_pairs is True and dm.from_pairs
with open(trainer.logger.log_dir + "/metrics.csv") as fh:
    names = next(csv.reader(fh))
assert "train/loss" in names and "train/kl" in names, names
print("OK", trainer.global_step, CountRows.rows, round(val["val/loss"], 4))
