"""dpo-eval (``evaluate``, in process) evaluates the trained adapter (peft.adapter_path), scores an export
against the reference it was trained with (reference.json), and reads every row of the file it is given."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from dpo_lightning.cli.locate import compose
from dpo_lightning.config.validate import ConfigError
from dpo_lightning.evaluate import evaluate


@pytest.fixture(scope="module")
def data(tmp_path_factory, default_data_path) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(open(default_data_path).readlines()[:20]))
    return path


def _eval(tmp_path, *overrides: str) -> dict:
    out = tmp_path / "eval.json"
    evaluate(compose("eval", [f"paths.output_dir={tmp_path}", f"output_json={out}", "data.max_length=48",
                              "data.batch_size=8", *overrides]))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_path):
    """A saved LoRA adapter whose B matrices are not zero (as after training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path), LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out, {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}


def test_training_starts_from_a_saved_adapter(tiny_path, adapter):
    from dpo_lightning import PreferenceLitModule

    path, saved = adapter
    module = PreferenceLitModule(str(tiny_path), peft={"method": "lora", "adapter_path": str(path)})
    state = {k: v for k, v in module.policy.state_dict().items() if "lora_B" in k}
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert all(p.requires_grad for n, p in module.policy.named_parameters() if "lora_" in n)
    assert module.reference.mode == "adapter"


def test_eval_scores_the_saved_adapter_not_fresh_ones(tmp_path, tiny_path, adapter, data):
    report = _eval(tmp_path, f"model.name_or_path={tiny_path}", "peft=lora", f"peft.adapter_path={adapter[0]}",
                   f"data.path={data}")
    assert report["metrics"]["val/rewards/chosen"] != 0.0  # fresh adapters (B = 0) would score exactly 0
    with pytest.raises(ConfigError, match="peft.adapter_path"):
        _eval(tmp_path, f"model.name_or_path={tiny_path}", "peft=lora", f"data.path={data}")


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_path):
    """A dpo-train export of a policy moved away from its reference (the tiny model at ``tiny_path``)."""
    from dpo_lightning import PreferenceLitModule
    from dpo_lightning.export import export_policy

    torch.manual_seed(0)
    module = PreferenceLitModule(str(tiny_path))
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    from dpo_lightning.models.hf import load_tokenizer

    return export_policy(trainer, module, load_tokenizer(module.model_spec),
                         tmp_path_factory.mktemp("run") / "export")


def test_eval_of_an_export_uses_the_reference_it_records(tmp_path, tiny_path, export, data, capsys):
    record = json.loads((export / "reference.json").read_text())
    assert record["name_or_path"] == str(Path(tiny_path).resolve()) and record["training_reference"] == "frozen_initial_weights"
    report = _eval(tmp_path, f"model.name_or_path={export}", f"data.path={data}")
    assert report["reference"] == str(Path(tiny_path).resolve()) and "reference.json" in capsys.readouterr().out
    assert report["metrics"]["val/rewards/chosen"] != 0.0  # against itself every reward would be 0


def test_eval_without_a_recorded_reference_asks_for_one(tmp_path, export, data):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in export.iterdir():
        if f.name != "reference.json":
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match="reference.name_or_path"):
        _eval(tmp_path, f"model.name_or_path={bare}", f"data.path={data}")
    report = _eval(tmp_path, f"model.name_or_path={bare}", f"data.path={data}", "reference.mode=copy")
    assert report["metrics"]["val/rewards/chosen"] == 0.0  # asked for explicitly: the policy against itself


def test_eval_reads_every_row_of_data_path_and_heldout_on_request(tmp_path, export, data, capsys):
    common = [f"model.name_or_path={export}", f"data.path={data}"]
    assert _eval(tmp_path, *common)["num_examples"] == 20  # the file the user gave, whole
    held = _eval(tmp_path, *common, "split=heldout")
    assert held["split"] == "heldout" and held["num_examples"] == 3  # dpo-train's 15 % (same seed)
    val = tmp_path / "val.jsonl"
    val.write_text("".join(data.read_text().splitlines(keepends=True)[:7]))
    assert _eval(tmp_path, *common, f"data.val_path={val}")["num_examples"] == 7
    capsys.readouterr()
    _eval(tmp_path, *common, "logger=csv")  # a training command line's logger is accepted, with a note
    assert "logger" in capsys.readouterr().out



def test_eval_measures_pref_loglik_against_the_reference(tmp_path, export, data):
    """dpo-eval of an export: val/pref_loglik is log sigmoid(0.1 x the margin against the reference its training
    started from), the sigmoid loss's own value at beta 0.1; not the evaluated model against itself (log sigmoid(0)
    for every model)."""
    m = _eval(tmp_path, "model=hf", f"model.name_or_path={export}", f"data.path={data}", "split=all",
              "loss=sigmoid", "loss.beta=0.1")["metrics"]
    assert abs(m["val/rewards/margins"]) > 1e-3, m  # the export moved from its reference
    assert m["val/pref_loglik"] == pytest.approx(-m["val/loss"], abs=1e-5), m
