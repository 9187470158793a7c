"""The Reference object: each mode's model and log-probs, its weights' names in checkpoints, the TR-DPO part of a
checkpoint, the export record, the one refusal of precompute with KTO's KL rows, and ``is_peft_model``."""

from __future__ import annotations

import json

import pytest
import torch

from dpo_lightning import PreferenceLitModule, ReferenceSpec, get_loss
from dpo_lightning.data.collate import PreferenceCollator, UnpairedCollator
from dpo_lightning.engine.logprobs import sequence_logps
from dpo_lightning.models.hf import ModelSpec, load_causal_lm
from dpo_lightning.models.peft import apply_peft, is_peft_model, peft_base
from dpo_lightning.reference.cache import compute_reference_logps
from dpo_lightning.reference.reference import Reference
from dpo_lightning.reference.spec import Mode, PrecomputeError, check_precompute, precompute_refusal

LORA = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def batch(tokenizer):
    rows = [{"prompt_ids": tokenizer(p)["input_ids"], "chosen_ids": tokenizer(c)["input_ids"] + [3],
             "rejected_ids": tokenizer(r)["input_ids"] + [3], "index": i}
            for i, (p, c, r) in enumerate([("user : hi assistant :", " hello !", " go away ."),
                                           ("user : name a fruit . assistant :", " an apple .", " no .")])]
    return PreferenceCollator(tokenizer.pad_token_id)(rows)


def _logps(model, batch):
    with torch.no_grad():
        return sequence_logps(model.eval(), batch, batch["num_sequences"], full_logits=True).logps


def test_mode_is_a_string_constant():
    assert Mode.CACHED == "cached" and Mode("adapter") is Mode.ADAPTER
    assert f"{Mode.COPY}" == "copy" and json.dumps({"mode": Mode.NONE}) == '{"mode": "none"}'


@pytest.mark.parametrize("spec,requires,peft,want", [
    ({}, False, False, Mode.NONE), ({"mode": "copy"}, False, True, Mode.NONE), ({}, True, False, Mode.COPY),
    ({}, True, True, Mode.ADAPTER), ({"name_or_path": "x"}, True, True, Mode.MODEL),
    ({"mode": "copy"}, True, True, Mode.COPY), ({"mode": "model"}, True, False, Mode.MODEL)])
def test_modes_resolve(spec, requires, peft, want):
    assert ReferenceSpec(**spec).resolve_mode(requires, peft) is want


@pytest.mark.parametrize("spec,peft,match", [({"mode": "none"}, False, "needs a reference model"),
                                             ({"mode": "adapter"}, False, "needs a LoRA policy"),
                                             ({"mode": "frozen"}, False, "use auto, copy")])
def test_invalid_modes_are_refused(spec, peft, match):
    with pytest.raises(ValueError, match=match):
        ReferenceSpec(**spec).resolve_mode(True, peft)


def test_copy_holds_the_frozen_model_under_its_own_weight_names(tiny_path, batch):
    m = PreferenceLitModule(str(tiny_path), loss="sigmoid")
    ref = m.reference
    assert isinstance(ref, Reference) and ref.mode is Mode.COPY and ref.needs_model and not ref.is_precomputed
    assert ref.module is not None and ref.module is not m.policy and not ref.moves
    model_keys = set(ref.module.state_dict())
    assert set(ref.state_dict()) == model_keys  # the frozen model's names, so checkpoints keep `reference.<name>`
    assert {k for k in m.state_dict() if k.startswith("reference.")} == {f"reference.{k}" for k in model_keys}
    assert not any(p.requires_grad for p in ref.parameters())
    m.train()
    assert not ref.training and not ref.module.training and m.policy.training
    with ref.scoring_model() as model:
        assert model is ref.module
    torch.testing.assert_close(ref.logps(batch, full_logits=True).logps, _logps(m.policy, batch), atol=1e-6, rtol=0)


def test_reference_free_loss_has_no_model(tiny_path, batch):
    ref = PreferenceLitModule(str(tiny_path), loss="simpo").reference
    assert ref.mode is Mode.NONE and ref.module is None and not ref.needs_model
    assert ref.logps(batch) is None and not list(ref.parameters())
    with ref.scoring_model() as model:
        assert model is None


def test_precomputed_reads_from_the_batch(tiny_path, batch):
    ref = PreferenceLitModule(str(tiny_path), loss="sigmoid", reference={"precompute": True}).reference
    assert ref.is_precomputed and ref.mode == "cached" and ref.module is None and not ref.needs_model
    assert ref.logps(batch) is None and ref.cache_infos == []


def test_adapter_reference_is_the_base_model(tiny_path, batch):
    m = PreferenceLitModule(str(tiny_path), loss="sigmoid", peft=LORA)
    ref = m.reference
    assert ref.mode is Mode.ADAPTER and ref.module is None and ref.needs_model and ref.policy is m.policy
    with torch.no_grad():
        for n, p in m.policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)  # as training would: the policy now differs from its base
    base = _logps(load_causal_lm(ModelSpec(str(tiny_path))), batch)
    torch.testing.assert_close(ref.logps(batch, full_logits=True).logps, base, atol=1e-5, rtol=0)
    assert not torch.allclose(_logps(m.policy, batch), base, atol=1e-4)


def test_a_model_with_top_level_tensors_is_held_whole(tiny_path, batch):
    """A structure the reference cannot adopt child by child (a tensor at the model's top level) still works."""
    model = load_causal_lm(ModelSpec(str(tiny_path)))
    model.register_buffer("logit_bias_", torch.zeros(1))
    ref = Reference(ReferenceSpec(), Mode.COPY, policy=model, policy_spec=ModelSpec(str(tiny_path)), module=model)
    assert set(ref.state_dict()) == {f"model_.{k}" for k in model.state_dict()}
    with ref.scoring_model() as scoring:
        assert scoring is model
    assert torch.equal(ref.logps(batch, full_logits=True).logps, _logps(model, batch))


def test_separate_model_in_another_dtype_and_its_record(tiny_path):
    m = PreferenceLitModule(str(tiny_path), loss="ipo", reference={"name_or_path": str(tiny_path),
                                                                   "dtype": "bfloat16"})
    ref = m.reference
    assert ref.mode is Mode.MODEL and ref.dtype == "bfloat16"
    assert next(ref.parameters()).dtype == torch.bfloat16
    record = ref.record()
    assert record["training_reference"] == "separate_model" and record["loss"] == "ipo" and record["dtype"] == "bfloat16"
    assert type(record["training_reference"]) is str and record["revision"] is None
    assert PreferenceLitModule(str(tiny_path), loss="simpo").reference.record()["training_reference"] == "none"


def test_checkpoint_drops_a_frozen_reference_and_keeps_a_moving_one(tiny_path):
    frozen = PreferenceLitModule(str(tiny_path), loss="sigmoid")
    ckpt = {"state_dict": frozen.state_dict()}
    frozen.reference.on_save_checkpoint(ckpt)
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"]) and ckpt["reference_version"] == 0

    moving = PreferenceLitModule(str(tiny_path), loss="sigmoid", reference={"sync": {"every_n_steps": 2}})
    assert moving.reference.moves and moving.reference.sync == (0.6, 2)
    moving.reference.version = 3
    ckpt = {"state_dict": moving.state_dict()}
    moving.reference.on_save_checkpoint(ckpt)
    keys = {k for k in ckpt["state_dict"] if k.startswith("reference.")}
    assert keys == {f"reference.{k}" for k in moving.reference.module.state_dict()} and ckpt["reference_version"] == 3
    # a checkpoint as every version of this module writes it: the reference under `reference.<model's names>`
    fresh = PreferenceLitModule(str(tiny_path), loss="sigmoid", reference={"sync": {"every_n_steps": 2}})
    fresh.reference.on_load_checkpoint(ckpt)
    assert fresh.load_state_dict(ckpt["state_dict"], strict=True) is not None and fresh.reference.version == 3
    without = {"state_dict": {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("reference.")}}
    with pytest.raises(KeyError, match="lacks the moved reference"):
        fresh.reference.on_load_checkpoint(without)


def test_kto_precompute_refusal_is_one_message(tiny_path, tokenizer):
    with pytest.raises(PrecomputeError) as built:
        PreferenceLitModule(str(tiny_path), loss=get_loss("kto"), reference={"precompute": True})
    assert str(built.value) == precompute_refusal("kto")
    rows = [{"index": 0, "prompt_ids": [5], "completion_ids": [6, 7], "label": True}]
    with pytest.raises(PrecomputeError) as direct:
        compute_reference_logps(torch.nn.Linear(1, 1), rows, UnpairedCollator(0, kl_pairs=True))
    assert str(direct.value) == precompute_refusal()
    assert "KL rows" in precompute_refusal() and "reference.precompute=false" in precompute_refusal()
    check_precompute(False, "kto")  # no KL rows: fine


def test_is_peft_model(tiny_path):
    plain = load_causal_lm(ModelSpec(str(tiny_path)))
    assert not is_peft_model(plain) and not is_peft_model(None) and peft_base(plain) is plain
    lora = apply_peft(load_causal_lm(ModelSpec(str(tiny_path))), LORA)
    assert is_peft_model(lora) and not is_peft_model(peft_base(lora))
    assert type(peft_base(lora)).__name__ == type(plain).__name__
