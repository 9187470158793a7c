"""bitsandbytes 4-bit / 8-bit + LoRA on the CPU (bitsandbytes >= 0.46 has CPU kernels).

A tiny model trains; only adapter weights change (the quantized base is byte-for-byte the same); the
adapter-disabled reference gives the log-probs of the quantized base model loaded on its own; exports.
"""

from __future__ import annotations

import types

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from dpo_lightning import ModelSpec, PreferenceDataModule, PreferenceLitModule  # noqa: E402
from dpo_lightning.engine.logprobs import sequence_logps  # noqa: E402
from dpo_lightning.models.hf import load_causal_lm  # noqa: E402
from dpo_lightning.models.quantization import bnb_config, bnb_kwargs, is_quantized  # noqa: E402

LORA = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
QUANT = {
    4: {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"},
    8: {"bits": 8},
}
LAYER = {4: "Linear4bit", 8: "Linear8bitLt"}


def _spec(bits: int) -> ModelSpec:
    return ModelSpec("builtin:tiny-llama", dtype="float32", quantization=QUANT[bits])


def _batches(n: int, batch_size: int = 8):
    dm = PreferenceDataModule("builtin:default_prefs", ModelSpec("builtin:tiny-llama"), batch_size=batch_size,
                              max_length=64, seed=0)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def batches():
    return _batches(4)


def test_bnb_config_mapping():
    cfg = bnb_config(QUANT[4])
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.float32
    assert bnb_config({"bits": 4, "quant_type": "fp4", "compute_dtype": "bf16"}).bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config({"bits": 8}).load_in_8bit
    assert bnb_config(None) is None and bnb_config({}) is None
    assert bnb_kwargs({"load_in_4bit": True})["bnb_4bit_quant_type"] == "nf4"
    for bad in ({"bits": 3}, {"bits": 4, "quant_type": "nf5"}, {"bits": 8, "quant_type": "nf4"}):
        with pytest.raises(ValueError):
            bnb_kwargs(bad)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_lora_trains_only_adapters_and_reference_is_the_base(bits, batches):
    torch.manual_seed(0)
    module = PreferenceLitModule(_spec(bits), loss="sigmoid", peft=LORA,
                                 optimizer={"name": "AdamW", "lr": 1e-2})
    policy = module.policy
    assert is_quantized(policy)
    assert module.reference.mode == "adapter" and module.reference.module is None  # no second copy of the weights
    kinds = {type(m).__name__ for m in policy.modules()}
    assert LAYER[bits] in kinds, kinds  # the linear layers really are bitsandbytes layers
    qweights = [m.weight for m in policy.modules() if type(m).__name__ == LAYER[bits]]
    assert qweights and all(w.dtype == (torch.uint8 if bits == 4 else torch.int8) for w in qweights)

    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), sorted(trainable)[:5]
    before = {k: v.detach().clone() for k, v in policy.state_dict().items()}

    optimizer = module.configure_optimizers()["optimizer"]
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for n, p in policy.named_parameters() if n in trainable)
    module.train()
    losses = []
    for batch in batches[:3]:
        out, _ = module.compute_loss(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))

    after = policy.state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "no weight changed: nothing trained"
    assert all("lora_" in k for k in changed), sorted(changed - {k for k in changed if "lora_" in k})[:5]
    assert any("lora_B" in k for k in changed)

    # The reference = the policy with adapters disabled = the quantized base model loaded on its own.
    module.eval()
    base = load_causal_lm(_spec(bits)).eval()
    batch = batches[3]
    with torch.no_grad():
        ref = module.reference_logps(batch)
        want = sequence_logps(base, batch, batch["num_sequences"])
        pol = module.policy_logps(batch)
    torch.testing.assert_close(ref.logps, want.logps, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pol.logps, ref.logps, atol=1e-4)  # the trained adapters do change the policy


def _fake_trainer():
    return types.SimpleNamespace(strategy=object(), is_global_zero=True)


def test_qlora_export_adapter_or_merged(tmp_path):
    from transformers import AutoModelForCausalLM

    from dpo_lightning.export import export_policy

    module = PreferenceLitModule(_spec(4), loss="sigmoid", peft=LORA)
    with torch.no_grad():  # make the adapters non-trivial
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    tok = PreferenceDataModule("builtin:default_prefs", ModelSpec("builtin:tiny-llama")).tokenizer

    adapter = export_policy(_fake_trainer(), module, tok, tmp_path / "adapter")
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert not (adapter / "model.safetensors").exists()

    merged = export_policy(_fake_trainer(), module, tok, tmp_path / "merged", merge_adapters=True)
    assert (merged / "model.safetensors").exists() and not (merged / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert getattr(model.config, "quantization_config", None) is None  # merged into full-precision weights
    assert not any("lora" in n for n, _ in model.named_parameters())
    # merged = unquantized base + the adapters' delta B @ A * scale
    base = load_causal_lm(ModelSpec("builtin:tiny-llama"))
    lora = module.policy.base_model.model.model.layers[0].self_attn.q_proj
    delta = (lora.lora_B["default"].weight @ lora.lora_A["default"].weight) * lora.scaling["default"]
    want = base.model.layers[0].self_attn.q_proj.weight + delta
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, want, atol=1e-5, rtol=1e-5)


def test_qlora_through_the_cli_config(tmp_path):
    """The composed config (quantization=bnb_4bit peft=lora) trains 2 steps and exports the adapter."""
    from dpo_lightning.cli.locate import compose
    from dpo_lightning.train import train

    cfg = compose("train", [f"paths.output_dir={tmp_path}", "logger=csv", "callbacks=none", "print_config=false",
                            "quantization=bnb_4bit", "model.quantization.compute_dtype=float32", "peft=lora",
                            "peft.dropout=0.0", "trainer.max_steps=2", "trainer.accelerator=cpu",
                            "eval_before=false", "data.val_fraction=0.05"])
    summary = train(cfg)
    assert summary["steps"] == 2
    assert (tmp_path / "export" / "adapter_config.json").exists()
