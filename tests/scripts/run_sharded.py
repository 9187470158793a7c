"""build + fit + validate + export of a run without validate_config (which refuses FSDP on CPU): test only.

Usage: run_sharded.py OVERRIDE... (Hydra overrides of the train config). Rank 0 prints one line
``RESULT {"steps", "val", "full_logits", "strategy", "version"}``."""

import json
import sys

import lightning as L

from dpo_lightning.cli.locate import compose
from dpo_lightning.export import export_policy
from dpo_lightning.train import build

cfg = compose("train", sys.argv[1:])
L.seed_everything(cfg.seed, workers=True)
objs = build(cfg)
module, dm, trainer = objs["module"], objs["datamodule"], objs["trainer"]
dm.setup("fit")
if cfg.get("eval_before"):  # as dpo-train does: validate (sets the strategy up once), then fit (again)
    trainer.validate(module, datamodule=dm, verbose=False)
trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
val = trainer.validate(module, datamodule=dm, verbose=False)
out = export_policy(trainer, module, dm.tokenizer, f"{cfg.paths.output_dir}/export")
if trainer.is_global_zero:
    print("RESULT " + json.dumps({"steps": trainer.global_step, "val": val[0]["val/loss"],
                                  "full_logits": module.full_logits, "strategy": type(trainer.strategy).__name__,
                                  "version": module.reference.version}))
