"""How ``dpo-eval`` reads its config: which rows it scores, which reference it scores against, and which
training-only settings it accepts and ignores (so a training command line can be reused).

    rows       data.val_path when given; else split=all (default): every row of data.path;
               split=heldout: the rows dpo-train held out of data.path (same seed and data.val_fraction)
    reference  reference.name_or_path when given; with peft.adapter_path the adapter-disabled base; else the
               record an export carries (``reference.json``, see ``export_record.py``); else it stops and asks
               (reference.mode=copy scores the policy against its own weights on purpose)
    logger     accepted as in dpo-train and ignored, with a note: the metrics go to ``output_json``
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from dpo_lightning.config.base import ConfigError
from dpo_lightning.config.values import loss_from_config
from dpo_lightning.reference.record import REFERENCE_FILE, read_reference_record
from dpo_lightning.reference.spec import AUTO, Mode

SPLITS = ("all", "heldout")


def prepare_eval(cfg: DictConfig) -> list[str]:
    """Check ``split``, fill the reference from the export's record, note ignored settings. Returns notes."""
    notes = []
    if cfg.get("logger"):
        names = ", ".join(str(k) for k in cfg.logger) or str(cfg.logger)
        notes.append(f"dpo-eval logs to no experiment logger ({names} ignored); the metrics go to {cfg.output_json}")
    split = cfg.get("split", "all")
    if split not in SPLITS:
        raise ConfigError(f"split={split}: use split=all (every row of data.path) or split=heldout (the rows "
                          "dpo-train held out, same seed and data.val_fraction); data.val_path is evaluated when given")
    return notes + _reference_from_export(cfg)


def _reference_from_export(cfg: DictConfig) -> list[str]:
    loss = loss_from_config(cfg)
    ref = cfg.get("reference") or {}
    if loss is None or not loss.requires_reference or ref.get("name_or_path") or ref.get("mode") in (Mode.COPY, Mode.NONE):
        return []
    peft = OmegaConf.select(cfg, "peft")
    if peft and peft.get("method", "lora") not in (None, "none") and ref.get("mode", AUTO) in (AUTO, Mode.ADAPTER):
        return []  # the adapter-disabled base model is the reference
    policy = str(OmegaConf.select(cfg, "model.name_or_path"))
    record = read_reference_record(policy)
    if record is None:
        raise ConfigError(f"dpo-eval: no reference named, and {policy} carries no {REFERENCE_FILE} (dpo-train "
                          "exports record theirs): the reference would be a copy of the evaluated policy and every "
                          "reward 0. Set reference.name_or_path=<the model training started from> (or "
                          "reference.mode=copy to score the policy against its own weights on purpose)")
    with open_dict(cfg):
        cfg.reference.name_or_path = record["name_or_path"]
        if record.get("dtype") and not ref.get("dtype"):
            cfg.reference.dtype = record["dtype"]
        if "tiny" in record:  # a built-in reference is rebuilt from the same tiny config
            cfg.model.tiny = record["tiny"]
    return [f"reference: {record['name_or_path']} (recorded by dpo-train in {policy}/{REFERENCE_FILE})"]


def eval_rows(dm, split: str) -> tuple[list[dict[str, Any]], str]:
    """(rows to score, what they are) for a ``PreferenceDataModule`` not yet set up."""
    if dm.val_path:
        dm.setup("validate")
        return dm.val_rows, "val_path"
    if split == "heldout":
        if not dm.val_fraction:
            raise ConfigError("split=heldout: data.val_fraction=0, so nothing was held out of data.path; use "
                              "split=all or give data.val_path")
        dm.setup("validate")
        return dm.val_rows, "heldout"
    dm.val_fraction = 0.0  # every row of data.path
    dm.setup("validate")
    return dm.train_rows, "all"
