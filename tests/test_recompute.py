"""Selective recomputation (``engine.recompute_pointwise``): bitwise the same log-probs and gradients as without
it on every architecture family, every layout; it really keeps less; it steps aside where it must."""

from __future__ import annotations

import pytest
import torch
from arch_families import FAMILIES, build
from helpers import V, make_rows, run

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.engine.recompute import (
    decoder_layers,
    disable_selective_recompute,
    enable_selective_recompute,
    recompute_status,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_numbers_on_every_family(family):
    model = build(family, V)
    rows = make_rows()
    for layout in ("plain", "prefix_shared"):
        batch = PreferenceCollator(0, layout=layout)(rows)
        ref = run(model, batch)
        assert enable_selective_recompute(model) == len(decoder_layers(model)) > 0, family
        got = run(model, batch)
        # MoE layers add their experts' outputs in place into a kept tensor: they step aside, the rest recompute
        assert recompute_status(model) == [family != "mixtral"] * len(decoder_layers(model)), family
        disable_selective_recompute(model)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), f"{family}/{layout}: log-probs"
        for k in ref[2]:
            assert torch.equal(got[2][k], ref[2][k]), f"{family}/{layout}: gradient of {k}"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_same_numbers_with_lora(dropout):
    """LoRA adapters recompute exactly; with adapter dropout on CPU (``bernoulli_`` into a fresh tensor, an
    in-place write the policy cannot keep) the layers step aside and the numbers are still the same."""
    from dpo_lightning.engine.logprobs import sequence_logps
    from dpo_lightning.models.peft import apply_peft

    model = apply_peft(build("llama", V), {"method": "lora", "r": 4, "alpha": 8, "dropout": dropout,
                                           "target_modules": "all-linear"})
    model.train()
    batch = PreferenceCollator(0, layout="prefix_shared")(make_rows())

    def lora_run():
        torch.manual_seed(5)
        model.zero_grad(set_to_none=True)
        out = sequence_logps(model, batch, batch["num_sequences"])
        (out.logps * torch.linspace(-1, 1, out.logps.numel())).sum().backward()
        return out.logps.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    ref = lora_run()
    assert enable_selective_recompute(model) > 0
    got = lora_run()
    assert recompute_status(model) == [dropout == 0.0] * len(decoder_layers(model))
    assert torch.equal(got[0], ref[0]) and ref[1] and ref[1].keys() == got[1].keys()
    for k in ref[1]:
        assert torch.equal(got[1][k], ref[1][k]), k


@pytest.mark.subprocess
def test_keeps_less_memory():
    """Activation memory after the forward (RSS with big blocks returned on free): under 70% of plain (~59% here)."""
    from helpers import run_script

    res = run_script("recompute_memory.py", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    plain, selective = map(int, res.stdout.split("KEPT")[1].split())
    assert plain > 20 and selective < 0.7 * plain, (plain, selective)


def test_no_grad_forward_untouched_and_idempotent():
    model = build("llama", V)
    n = enable_selective_recompute(model)
    assert enable_selective_recompute(model) == n  # wrapping twice does not nest
    batch = PreferenceCollator(0, layout="prefix_shared")(make_rows())
    from dpo_lightning.engine.logprobs import sequence_logps

    with torch.no_grad():
        a = sequence_logps(model, batch, batch["num_sequences"]).logps
    disable_selective_recompute(model)
    with torch.no_grad():
        b = sequence_logps(model, batch, batch["num_sequences"]).logps
    assert torch.equal(a, b)
    assert all("forward" not in vars(layer) for layer in decoder_layers(model))


def test_steps_aside_for_quantized_models():
    model = build("llama", V)
    model.config.quantization_config = {"load_in_4bit": True}
    assert enable_selective_recompute(model) == 0
    assert all("forward" not in vars(layer) for layer in decoder_layers(model))


def test_lightning_fit_is_bitwise_identical_and_switch_works(tiny_path, default_data_path):
    """What users run: a Lightning fit with the option on (the default) and off gives the same weights."""
    import lightning as L

    from dpo_lightning import PreferenceDataModule, PreferenceLitModule

    def fit(**kw):
        torch.manual_seed(0)
        module = PreferenceLitModule(str(tiny_path), loss="sigmoid", optimizer={"lr": 1e-3}, **kw)
        dm = PreferenceDataModule(default_data_path, str(tiny_path), batch_size=4, max_length=48, val_fraction=0)
        L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0).fit(module, datamodule=dm)
        return {k: v.clone() for k, v in module.policy.state_dict().items()}, recompute_status(module.policy)

    on, status_on = fit()
    off, status_off = fit(recompute_pointwise=False)
    assert status_on and all(status_on) and all(s is None for s in status_off)
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)
    start = PreferenceLitModule(str(tiny_path)).policy.state_dict()
    assert any(not torch.equal(on[k], start[k]) for k in on)  # the three steps did train
