"""dpo-eval: score a policy against a reference on a dataset; print and write the val/ metrics as JSON.

    dpo-eval model=hf model.name_or_path=outputs/train/runs/<run>/export data.path=heldout.jsonl
    dpo-eval model=hf model.name_or_path=outputs/train/runs/<run>/export split=heldout   # dpo-train's held-out rows
    dpo-eval reference.name_or_path=gpt2 model=hf model.name_or_path=./my-policy loss=ipo
    dpo-eval model=hf model.name_or_path=<base> peft=lora peft.adapter_path=outputs/train/runs/<run>/export

Every row of data.path by default (data.val_path when given). The reference is reference.name_or_path, or
the one the export records (reference.json), or the adapter-disabled base; see ``eval_setup.py``.

The metrics are the training module's own (same loss, same names), averaged over the whole set.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from dpo_lightning.callbacks.generation import generation_callback, write_generations
from dpo_lightning.cli.build import build, build_trainer
from dpo_lightning.cli.eval_setup import eval_rows, prepare_eval
from dpo_lightning.cli.locate import config_dir
from dpo_lightning.cli.runtime import find_error, print_config_tree
from dpo_lightning.config.validate import validate_config
from dpo_lightning.data.formats import DataError
from dpo_lightning.files.atomic import WriteError, atomic_write_json
from dpo_lightning.reference.spec import Mode


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate and return {metric: value}; also written to ``cfg.output_json``."""
    for note in prepare_eval(cfg):  # rows, reference from the export's record, ignored training settings
        print(f"[dpo-eval] {note}")
    validate_config(cfg, training=False)  # before any model loads
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("print_config"):
        print_config_tree(cfg)
    objs = build(cfg, training=False)  # the construction dpo-train uses, without optimizer and scheduler
    model_spec, loss, dm, module = objs["model_spec"], objs["loss"], objs["datamodule"], objs["module"]
    module.pref_baseline = "reference"  # val/pref_loglik against the reference, not the evaluated model itself
    rows, split = eval_rows(dm, cfg.get("split", "all"))
    generation = generation_callback(cfg, rows, dm)  # generation.num_prompts > 0: sample and score too
    trainer = build_trainer(cfg, logger=False, callbacks=[generation] if generation else [],
                            enable_checkpointing=False, enable_model_summary=False)
    loader = dm._loader(sorted(rows, key=lambda r: r["index"]), dm.eval_batch_size, shuffle=False)
    results = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    metrics = {k: float(v) for k, v in sorted(results.items())}
    report = {"metrics": metrics, "num_examples": len(rows), "policy": model_spec.name_or_path,
              "reference": module.reference.mode.value if module.reference.mode is not Mode.MODEL
              else module.reference.spec.name_or_path, "loss": {"name": loss.name, **loss.hparams},
              "data": str(cfg.data.val_path or cfg.data.path), "split": split}
    if generation is not None:  # the samples beside eval.json
        report["generations"] = str(write_generations(generation, cfg.output_json))
    atomic_write_json(cfg.output_json, report)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {cfg.output_json}")
    return metrics


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    try:
        evaluate(cfg)
    except Exception as err:
        known = find_error(err, (DataError, FileNotFoundError, ValueError, WriteError))
        if known is None:
            raise
        print(f"error: {known}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
