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
