"""Where an export's reference came from: ``reference.json`` beside the exported weights.

``dpo-train`` writes it inside the export (in the same temporary folder, so it appears with the weights or
not at all); ``dpo-eval`` of that export reads it and scores the policy against the same reference, instead
of against a copy of the evaluated policy (which makes every reward 0).

    {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "dtype": "bfloat16", "revision": null,
     "training_reference": "frozen_initial_weights", "loss": "sigmoid"}

``training_reference`` says how training computed the reference's log-probs (``TRAINING_REFERENCE``: a frozen
copy of the initial weights, the base with adapters disabled, precomputed log-probs, none); it is not
``reference.mode=copy`` of ``dpo-eval`` (scoring a policy against its own weights). Records written before
the field was named (``"mode": "copy"`` ...) are read with it filled in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REFERENCE_FILE = "reference.json"
# reference mode during training -> the record's ``training_reference``
TRAINING_REFERENCE = {"copy": "frozen_initial_weights", "model": "separate_model",
                      "adapter": "base_with_adapters_disabled", "cached": "precomputed_log_probs", "none": "none"}


def reference_record(reference) -> dict[str, Any]:
    """A ``Reference`` (``reference.py``) as a JSON-able dict: a separately named model, else the policy's
    initial weights (copy, adapter-disabled base, cached or reference-free training alike)."""
    spec, model = reference.spec, reference.policy_spec
    name = spec.name_or_path or model.name_or_path
    if not name.startswith("builtin:") and Path(name).exists():
        name = str(Path(name).resolve())  # a relative local path would depend on the working directory
    record: dict[str, Any] = {"name_or_path": name, "dtype": reference.dtype,
                              "revision": None if spec.name_or_path else model.revision,
                              "training_reference": TRAINING_REFERENCE.get(reference.mode.value,
                                                                           reference.mode.value),
                              "loss": reference.loss_name}
    if name.startswith("builtin:"):
        record["tiny"] = dict(model.tiny or {})
    return record


def read_reference_record(model_path: str | Path) -> dict[str, Any] | None:
    """The record of a local export folder, or None (hub id, no record, unreadable)."""
    path = Path(str(model_path)).expanduser() / REFERENCE_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and record.get("name_or_path")):
        return None
    if "mode" in record and "training_reference" not in record:  # a record written before the field was named
        record["training_reference"] = TRAINING_REFERENCE.get(record.pop("mode"), "unknown")
    return record
