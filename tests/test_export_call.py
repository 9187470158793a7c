"""One call exports a module trained in a plain Lightning script: policy, tokenizer and reference record
(``export_module``); the record names how training computed its reference (``training_reference``), and
records written before (``"mode": "copy"``) still read."""

from __future__ import annotations

import json

import lightning as L
import torch

from dpo_lightning import PreferenceDataModule, PreferenceLitModule
from dpo_lightning.export import export_module
from dpo_lightning.reference.record import read_reference_record


def test_export_module_after_a_plain_lightning_fit(tmp_path, tiny_path, default_data_path, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    module = PreferenceLitModule(str(tiny_path), optimizer={"lr": 1e-2})
    data = PreferenceDataModule(default_data_path, tokenizer=str(tiny_path), batch_size=4, max_length=32,
                                cache_dir=str(tmp_path / "cache"))
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=data)
    out = export_module(module, tmp_path / "my-policy")  # the tokenizer comes from the module's model
    assert AutoTokenizer.from_pretrained(out).eos_token == "</s>"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    trained = dict(module.policy.named_parameters())
    assert all(torch.equal(p, trained[k].detach()) for k, p in loaded.named_parameters())
    record = json.loads((out / "reference.json").read_text())
    assert record["training_reference"] == "frozen_initial_weights" and "mode" not in record
    # a module never trained (no trainer) is exported as it is
    fresh = export_module(PreferenceLitModule(str(tiny_path)), tmp_path / "fresh", tokenizer=data.tokenizer)
    assert (fresh / "model.safetensors").exists() and (fresh / "reference.json").exists()


def test_an_old_record_with_mode_copy_reads(tmp_path):
    (tmp_path / "reference.json").write_text(json.dumps({"name_or_path": "gpt2", "mode": "copy", "loss": "ipo"}))
    record = read_reference_record(tmp_path)
    assert record["training_reference"] == "frozen_initial_weights" and record["name_or_path"] == "gpt2"
