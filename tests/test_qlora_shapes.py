"""QLoRA on any layer shape, on CPUs with and without AVX512-BF16.

bitsandbytes (0.49+) repacks a ``Linear4bit`` weight into a CPU-only layout on its first eval no-grad pass when
the layer's ``support_avx512bf16_for_cpu`` flag is on (set from the CPU when the layer is built); that layout
asserts out_features % 32 == 0 ("N must be divisible by block_n"). The ``avx512`` fixture makes layers built
after it come up with the flag on, as on such a CPU, so these tests do not depend on the CPU CI gets.
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from dpo_lightning import ModelSpec, PreferenceDataModule, PreferenceLitModule  # noqa: E402
from dpo_lightning.models.hf import load_causal_lm  # noqa: E402
from dpo_lightning.models.peft import apply_peft  # noqa: E402
from dpo_lightning.models.quantization import CPU_PACKED_FLAG, keep_off_cpu_packed_path  # noqa: E402

HAS_FLAG = hasattr(bnb.nn.Linear4bit(8, 8), CPU_PACKED_FLAG)
needs_flag = pytest.mark.skipif(not HAS_FLAG, reason="this bitsandbytes has no CPU packed (AVX512-BF16) path")
LORA = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
QUANT = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
# (hidden, intermediate, heads): widths that are not multiples of 32 (688 as in the report, 100, 72).
SHAPES = {"i688": (64, 688, 4), "h72-i100": (72, 100, 4), "h100-i72": (100, 72, 2)}


@pytest.fixture(params=["this-cpu", "avx512-bf16"])
def cpu(request, monkeypatch):
    """Both CPUs: this one as it is, and one whose 4-bit layers come up on the packed path."""
    if request.param == "avx512-bf16":
        if not HAS_FLAG:
            pytest.skip("this bitsandbytes has no CPU packed (AVX512-BF16) path")
        monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    return request.param


def _spec(shape: str) -> ModelSpec:
    hidden, inter, heads = SHAPES[shape]
    return ModelSpec("builtin:tiny-llama", dtype="float32", quantization=QUANT,
                     tiny={"hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
                           "num_key_value_heads": 2})


def _layers(model) -> list[torch.nn.Module]:
    found = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert found, "no 4-bit layer: the model was not quantized"
    return found


def _packed(layer) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


@pytest.fixture(scope="module")
def batches():
    dm = PreferenceDataModule("builtin:default_prefs", ModelSpec("builtin:tiny-llama"), batch_size=4,
                              max_length=48, seed=0)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(3)]


@needs_flag
def test_the_simulated_cpu_reaches_the_packed_path(monkeypatch):
    """Control: with the flag on, bitsandbytes itself stops on a width-100 layer (what users hit)."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    layer = bnb.nn.Linear4bit(64, 100, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    assert getattr(layer, CPU_PACKED_FLAG)
    with pytest.raises(AssertionError, match="block_n"), torch.no_grad():
        layer.eval()(torch.randn(2, 64))
    assert keep_off_cpu_packed_path(layer) == 1 and not getattr(layer, CPU_PACKED_FLAG)
    with torch.no_grad():
        assert layer(torch.randn(2, 64)).shape == (2, 100)
    assert not _packed(layer)


@needs_flag
def test_no_4bit_layer_we_load_is_left_on_the_packed_path(cpu):
    """Every path that loads a 4-bit model leaves bitsandbytes' flag off, whatever the CPU says."""
    spec = _spec("i688")
    direct = load_causal_lm(spec)
    assert not any(getattr(m, CPU_PACKED_FLAG) for m in _layers(direct))
    module = PreferenceLitModule(spec, loss="sigmoid", peft=LORA)  # policy + adapter-disabled reference
    assert not any(getattr(m, CPU_PACKED_FLAG) for m in _layers(module.policy))
    # A 4-bit model loaded outside load_causal_lm is switched off when adapters are applied.
    from transformers import AutoModelForCausalLM

    from dpo_lightning.models.hf import resolve_path
    from dpo_lightning.models.quantization import bnb_config

    raw = AutoModelForCausalLM.from_pretrained(resolve_path(spec), quantization_config=bnb_config(QUANT),
                                               device_map={"": "cpu"}, dtype=torch.float32)
    if cpu == "avx512-bf16":
        assert all(getattr(m, CPU_PACKED_FLAG) for m in _layers(raw))
    assert not any(getattr(m, CPU_PACKED_FLAG) for m in _layers(apply_peft(raw, LORA)))


def test_keep_off_unpacks_a_layer_already_packed(monkeypatch):
    """A layer that already ran on the packed path goes back to the plain one (bitsandbytes' inverse)."""
    if not HAS_FLAG:
        pytest.skip("this bitsandbytes has no CPU packed (AVX512-BF16) path")
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    x = torch.randn(3, 64)
    want = layer(x).detach()  # train mode: the plain path
    with torch.no_grad():
        layer.eval()(x)  # packs (96 is a multiple of 32)
    assert _packed(layer)
    keep_off_cpu_packed_path(layer)
    assert not _packed(layer) and not getattr(layer, CPU_PACKED_FLAG)
    with torch.no_grad():
        got = layer(x)
    assert not _packed(layer)
    # bitsandbytes' inverse is lossy (scales rounded to bf16): close to, not equal to, the original
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_qlora_trains_and_evaluates_on_any_shape(shape, cpu, batches):
    """Train steps, then eval no-grad passes (validation, the adapter-disabled reference), then train again:
    finite losses, adapters move, and eval-mode log-probs equal train-mode ones (no bf16 packed kernel)."""
    torch.manual_seed(0)
    module = PreferenceLitModule(_spec(shape), loss="sigmoid", peft=LORA, optimizer={"name": "AdamW", "lr": 1e-2})
    layers = _layers(module.policy)
    assert any(m.out_features % 32 for m in layers)  # shapes the packed layout cannot hold are really there
    optimizer = module.configure_optimizers()["optimizer"]
    lora_before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}

    def step(batch):
        module.train()
        out, _ = module.compute_loss(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        return out.loss.detach()

    losses = [step(batches[0])]
    module.eval()
    with torch.no_grad():  # validation + reference pass: where bitsandbytes would pack
        val, _ = module.compute_loss(batches[1])
        eval_pol, eval_ref = module.policy_logps(batches[1]), module.reference_logps(batches[1])
    assert not any(_packed(m) for m in layers)
    module.train()
    with torch.no_grad():
        train_pol, train_ref = module.policy_logps(batches[1]), module.reference_logps(batches[1])
    torch.testing.assert_close(eval_pol.logps, train_pol.logps, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(eval_ref.logps, train_ref.logps, atol=1e-6, rtol=1e-6)
    losses.append(step(batches[2]))  # a training step after the eval pass still has its gradient
    assert all(torch.isfinite(x) for x in [*losses, val.loss])
    moved = [n for n, p in module.policy.named_parameters() if p.requires_grad
             and not torch.equal(p.detach(), lora_before[n])]
    assert any("lora_B" in n for n in moved)
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in module.policy.named_parameters() if "layers.0." in n and "lora_A" in n)


@needs_flag
def test_dpo_train_qlora_with_intermediate_688_on_an_avx512_cpu(tmp_path, monkeypatch):
    """The reported run: quantization=bnb_4bit peft=lora on a Llama with intermediate size 688, validating
    before and during training (eval no-grad passes), on a CPU whose 4-bit layers start on the packed path."""
    from dpo_lightning.cli.locate import compose
    from dpo_lightning.train import train

    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    cfg = compose("train", [f"paths.output_dir={tmp_path}", "logger=csv", "callbacks=none", "print_config=false",
                            "quantization=bnb_4bit", "model.quantization.compute_dtype=float32", "peft=lora",
                            "peft.dropout=0.0", "+model.tiny.intermediate_size=688", "trainer.max_steps=2",
                            "trainer.accelerator=cpu", "+trainer.limit_val_batches=1", "trainer.val_check_interval=1",
                            "eval_before=true", "data.val_fraction=0.05"])
    summary = train(cfg)
    assert summary["steps"] == 2
    assert (tmp_path / "export" / "adapter_config.json").exists()
