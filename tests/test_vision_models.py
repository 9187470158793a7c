"""Tiny image-text-to-text models (models/tiny_vlm.py) and loading them through the normal path (models/hf.py,
models/vision.py): every family saves and loads back with the Auto classes, its processor's image tokens match what
its model accepts, and the forward gives finite logits."""

from __future__ import annotations

import pytest
import torch
from helpers import VISION_PROMPT, needs_for_family, requires_vision, shape_image

from dpo_lightning.models import tiny_vlm

pytestmark = requires_vision


def _forward(model, processor, image=None):
    """The processor's batch for the chat-templated prompt and one image, and the model's logits on it."""
    prompt = processor.apply_chat_template(VISION_PROMPT, add_generation_prompt=True)
    batch = processor(text=[prompt + " red </s>"], images=[image or shape_image()], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    return batch, logits


@pytest.mark.parametrize("family", tiny_vlm.FAMILIES)
def test_family_saves_loads_and_runs(family, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    needs_for_family(family)
    tiny_vlm.save(family, tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert model.config.model_type == family
    assert model.config.get_text_config().vocab_size >= len(processor.tokenizer)
    batch, logits = _forward(model, processor)
    n_image = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert 4 <= n_image <= 32, n_image  # a few image tokens by default
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3", "gemma3"])
def test_image_size_asks_for_more_image_tokens(family):
    needs_for_family(family)
    counts = []
    for side in (None, 128):
        model, processor = tiny_vlm.build(family, image_size=side)
        batch, logits = _forward(model, processor, shape_image(100))
        counts.append(int((batch["input_ids"] == model.config.image_token_id).sum()))
        assert torch.isfinite(logits).all()
    assert counts[1] >= 4 * counts[0], counts


def test_build_is_seeded_and_overrides_reach_the_configs():
    a, _ = tiny_vlm.build("llava", seed=3, hidden_size=96, vision_hidden_size=64)
    b, _ = tiny_vlm.build("llava", seed=3, hidden_size=96, vision_hidden_size=64)
    assert a.config.text_config.hidden_size == 96 and a.config.vision_config.hidden_size == 64
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_vocabulary_covers_the_shapes_words_and_keeps_the_text_default():
    from dpo_lightning.models import tiny

    tok = tiny_vlm.build_tokenizer("llava")
    words = "what colour shape is the how many are there in image ? . a an it red green blue yellow purple " \
            "orange black white circle square triangle one two three four five 0 1 2 3 4 5 6 7 8 9"
    assert tok.unk_token_id not in tok(words, add_special_tokens=False).input_ids
    assert tiny_vlm.vocab()[:len(tiny.default_vocab())] == tiny.default_vocab()
    assert len(tiny.build_tokenizer()) == len(tiny.default_vocab())  # the text model's tokenizer is unchanged


def test_materialize_caches_and_resolve_path_routes_builtin_names():
    from dpo_lightning.models.hf import ModelSpec, resolve_path

    first = tiny_vlm.materialize("tiny-vlm")
    assert tiny_vlm.materialize("tiny-vlm") == first
    assert resolve_path(ModelSpec("builtin:tiny-vlm")) == str(first)
    assert "tiny-vlm-gemma3" in resolve_path(ModelSpec("builtin:tiny-vlm-gemma3"))
    assert "tiny-llama" in resolve_path(ModelSpec("builtin:tiny-llama"))
    with pytest.raises(ValueError, match="tiny-vlm-llava"):
        tiny_vlm.materialize("tiny-vlm-nope")


# ------------------------------------------------------------------ loading through models/hf.py
@pytest.mark.parametrize("family", tiny_vlm.FAMILIES)
def test_family_loads_through_the_normal_path(family, tmp_path):
    from dpo_lightning.models.hf import ModelSpec, load_causal_lm, load_tokenizer
    from dpo_lightning.models.vision import is_processor, is_vision_model, text_tokenizer

    needs_for_family(family)
    tiny_vlm.save(family, tmp_path)
    spec = ModelSpec(name_or_path=str(tmp_path))
    model, processor = load_causal_lm(spec), load_tokenizer(spec)
    assert is_vision_model(model) and is_vision_model(model.config) and is_processor(processor)
    assert type(model).__name__ == type(tiny_vlm.build(family)[0]).__name__  # the image-text-to-text class
    assert model.config.use_cache is False
    tok = text_tokenizer(processor)
    assert tok is processor.tokenizer and tok.pad_token is not None and tok.eos_token is not None
    _, logits = _forward(model, processor)
    assert torch.isfinite(logits).all()


def test_text_models_stay_on_the_text_path(tiny_path):
    from dpo_lightning.models.hf import ModelSpec, load_tokenizer
    from dpo_lightning.models.vision import is_processor, is_vision_model, text_tokenizer

    tok = load_tokenizer(ModelSpec("builtin:tiny-llama"))
    assert not is_processor(tok) and text_tokenizer(tok) is tok
    from transformers import AutoConfig, Gemma3TextConfig

    assert not is_vision_model(AutoConfig.from_pretrained(tiny_path))
    assert not is_vision_model(Gemma3TextConfig())
    assert not is_vision_model(object()) and not is_vision_model(None) and not is_vision_model(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["llava", "idefics3", "qwen2_vl", "gemma3"])
def test_freeze_vision_tower_freezes_exactly_what_is_outside_the_language_model(family):
    from dpo_lightning.models.vision import freeze_vision_tower, language_model

    needs_for_family(family)
    model, _ = tiny_vlm.build(family)
    lm = language_model(model)
    lm_params = {id(p) for p in lm.parameters()} | {id(p) for p in model.get_output_embeddings().parameters()}
    frozen = set(freeze_vision_tower(model))
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in lm_params), name
        assert (name in frozen) == (id(p) not in lm_params), name
    assert frozen and any("vision" in n or "visual" in n for n in frozen)


def test_freeze_vision_tower_of_an_unknown_structure_warns_and_freezes_nothing(caplog):
    from dpo_lightning.models.vision import freeze_vision_tower, lora_targets

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with caplog.at_level("WARNING", logger="dpo_lightning"):
        assert freeze_vision_tower(model) == []
    assert "cannot find the language model" in caplog.text
    assert all(p.requires_grad for p in model.parameters())
    assert lora_targets(model) is None


def test_the_policy_trains_the_language_model_only_unless_asked(tmp_path):
    from dpo_lightning import ModelSpec, PreferenceLitModule

    tiny_vlm.save("llava", tmp_path)
    frozen = PreferenceLitModule(ModelSpec(str(tmp_path)), loss="sigmoid")
    trainable = {n for n, p in frozen.policy.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.language_model.", "lm_head.")) for n in trainable)
    full = PreferenceLitModule(ModelSpec(str(tmp_path), freeze_vision=False), loss="sigmoid")
    assert all(p.requires_grad for p in full.policy.parameters())


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_lora_on_a_vision_model_targets_the_language_model(family):
    from dpo_lightning.models.peft import apply_peft

    model, processor = tiny_vlm.build(family)
    vision_before = {n: p.detach().clone() for n, p in model.named_parameters() if "language_model" not in n
                     and "text_model" not in n and not n.startswith("lm_head")}
    peft_model = apply_peft(model, {"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"})
    lora = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora and all(("language_model" in n or "text_model" in n) for n in lora)
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == set(lora)
    # one optimizer step through the adapters leaves the vision tower and projector as they were
    batch, _ = _forward(peft_model, processor)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    peft_model(**batch).logits.float().square().mean().backward()
    opt.step()
    after = dict(peft_model.get_base_model().named_parameters())
    for name, value in vision_before.items():
        assert torch.equal(after[name], value), name


# ------------------------------------------------------------------ QLoRA: the vision tower stays in full precision
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_vision_model_keeps_the_vision_tower_in_full_precision(bits, tmp_path):
    pytest.importorskip("bitsandbytes")
    from dpo_lightning.models.hf import ModelSpec, load_causal_lm
    from dpo_lightning.models.peft import apply_peft
    from dpo_lightning.models.vision import is_vision_model

    tiny_vlm.save("llava", tmp_path)
    quant = {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32"} if bits == 4 else {"bits": 8}
    model = load_causal_lm(ModelSpec(str(tmp_path), quantization=quant))
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {n for n, k in kinds.items() if k.startswith("Linear4bit" if bits == 4 else "Linear8bit")}
    assert quantized and all(n.startswith("model.language_model.") for n in quantized)
    assert all(kinds[n] == "Linear" for n in kinds if n.startswith(("model.vision_tower", "model.multi_modal")))
    policy = apply_peft(model, {"method": "lora", "r": 4, "alpha": 8})
    assert is_vision_model(policy)
    assert all("language_model" in n for n, p in policy.named_parameters() if p.requires_grad)
    processor = tiny_vlm.build("llava")[1]
    _, logits = _forward(policy, processor)
    assert torch.isfinite(logits).all()


# ------------------------------------------------------------------ the embedded default needs PIL only
def test_builtin_tiny_vlm_processor_has_no_torchvision_part():
    import transformers

    from dpo_lightning.models.hf import ModelSpec, load_tokenizer

    processor = load_tokenizer(ModelSpec("builtin:tiny-vlm"))
    assert type(processor).__name__ == "LlavaProcessor" and not tiny_vlm.FAMILY_SPECS["llava"].needs_torchvision
    assert "video_processor" not in type(processor).get_attributes()  # video processors need torchvision
    pil_class = type(processor.image_processor).__name__.removesuffix("Pil") + "Pil"
    assert getattr(transformers, pil_class).__mro__[1].__name__ == "PilBackend"


@pytest.mark.slow
@pytest.mark.subprocess
def test_builtin_tiny_vlm_works_without_torchvision(tmp_path):
    import json

    from helpers import run_script, script_env

    res = run_script("tiny_vlm_without_torchvision.py", env=script_env(DPO_LIGHTNING_CACHE=str(tmp_path)))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    assert out == {"processor": "LlavaProcessor", "image_processor": "CLIPImageProcessorPil", "image_tokens": 16,
                   "finite": True, "torchvision": False}
