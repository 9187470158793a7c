"""Import dpo-train's and dpo-eval's modules and the callbacks, then run a run's data path twice (read, tokenize in
one process: a cache miss, then a hit). Usage: data_path_imports.py DATA_PATH TINY_MODEL_PATH CACHE_DIR.
Prints, as its last line, the JSON list of every module loaded."""

import json
import sys

import dpo_lightning.callbacks  # noqa: F401
import dpo_lightning.evaluate  # noqa: F401
import dpo_lightning.train  # noqa: F401
from dpo_lightning.data.datamodule import PreferenceDataModule

data, tiny, cache_dir = sys.argv[1:4]
for _ in range(2):  # a miss (tokenizes) then a hit
    dm = PreferenceDataModule(data, tiny, cache_dir=cache_dir, max_length=64)
    dm.setup("fit")
    next(iter(dm.train_dataloader()))
print(json.dumps(sorted(sys.modules)))
