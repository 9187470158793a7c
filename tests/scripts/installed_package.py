"""Run against an installed (unpacked wheel) dpo_lightning on PYTHONPATH: the configs are found inside it and
compose, and the embedded dataset loads. Prints ``<default loss name> <number of embedded records>``."""

from dpo_lightning.cli.locate import compose, config_dir
from dpo_lightning.data.formats import load_records

d = config_dir()
assert "site" in str(d), d
cfg = compose("train", ["paths.output_dir=/tmp/x"])
print(cfg.loss.name, len(load_records("builtin:default_prefs")))
