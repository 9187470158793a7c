"""The exactness matrix for vision-language models: every layout of a batch with images against the model's own
forward on TRL's plain rows (each image given twice), per family: sequence log-probs within 1e-5 in fp32, the
same gradients, bf16 within the text path's tolerance; and a test that shows the matrix can fail.

The oracle is independent of our collator: the family's processor is called once per pair (its images and the
chat-templated prompt), completions are tokenized by its tokenizer, and the pixel tensors are concatenated in the
order of the image tokens. The collator's own tensors are checked against the processor in test_vision_data.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import needs_for_family, requires_vision, vision_family_params
from PIL import Image

from dpo_lightning.data.layouts import PACKED, PACKED_UNSHARED, PLAIN, PREFIX_SHARED, image_dim, layout_batch
from dpo_lightning.engine.logprobs import sequence_logps
from dpo_lightning.engine.probe import LOW_PRECISION_TOLERANCE, check_images
from dpo_lightning.models import tiny_vlm
from dpo_lightning.models.quirks import EnginePlan, engine_plan

pytestmark = requires_vision
FAMILIES = list(tiny_vlm.FAMILIES)  # every image-text-to-text family the tiny builder knows
DROP = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels")


def _family(name: str):
    needs_for_family(name)
    model, processor = tiny_vlm.build(name)
    return model.eval(), processor


def _image(seed: int, size=(40, 36)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


def _pairs(processor, images_per_pair=(1, 2)):
    """Prompt ids (image tokens expanded), completion ids and each pair's pixel tensors, for two pairs."""
    tok = processor.tokenizer
    prompts, parts = [], []
    for i, n in enumerate(images_per_pair):
        imgs = [_image(10 * i + k, (40 + 8 * k, 36)) for k in range(n)]
        content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": "what colour is the shape ?"}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        out = processor(images=imgs, text=[text], add_special_tokens=False, return_tensors="pt")
        prompts.append(out["input_ids"][0].tolist())
        part = {k: v for k, v in out.items() if k not in DROP}
        if "pixel_attention_mask" in part:  # Idefics3 / SmolVLM: one row holding every image, [1, images, ...]
            part = {k: v.flatten(0, 1)[None] if k in ("pixel_values", "pixel_attention_mask") else v
                    for k, v in part.items()}
        parts.append(part)
    ids = [[tok(t, add_special_tokens=False)["input_ids"] for t in texts]
           for texts in (["red circle </s>", "two"], ["blue </s>", "three squares . </s>"])]
    return prompts, ids, parts


def _images(parts: list[dict]) -> dict:
    """The pixel tensors of ``parts`` (one dict per prompt copy) in that order."""
    return {k: torch.cat([p[k] for p in parts], dim=image_dim(k, parts[0])) for k in parts[0]}


def _batch(layout, prompts, completions, parts, pad):
    """A batch of ``layout`` whose images follow its rows' image tokens: TRL's plain rows read every pair's
    images for the chosen rows, then again for the rejected; prefix sharing once; packed_unshared per sequence."""
    batch = layout_batch(layout, prompts, completions, pad_token_id=pad)
    copies = {PLAIN: parts * 2, PACKED_UNSHARED: [p for p in parts for _ in range(2)]}.get(layout, parts)
    batch["vision"] = _images(copies)
    return batch


def _logps(model, batch, plan, full_logits=False):
    out = sequence_logps(model, batch, batch["num_sequences"], plan=plan, full_logits=full_logits)
    return out.logps


def _own_plan(model):
    return EnginePlan(head=None, layouts={PLAIN}, vision=engine_plan(model).vision)


@pytest.mark.parametrize("family", vision_family_params(FAMILIES))
def test_every_layout_matches_the_models_own_forward(family):
    model, processor = _family(family)
    prompts, completions, parts = _pairs(processor)
    pad = processor.tokenizer.pad_token_id or 0
    plan = engine_plan(model)
    assert plan.vision is not None and plan.vision.image_token_id is not None
    assert {PREFIX_SHARED, PACKED, PACKED_UNSHARED} <= plan.vision.layouts, plan.vision.note  # once per pair
    params = [p for p in model.parameters() if p.requires_grad]

    def run(layout, own=False):
        model.zero_grad()
        lp = _logps(model, _batch(layout, prompts, completions, parts, pad), _own_plan(model) if own else plan,
                    full_logits=own)
        (lp * torch.tensor([1.0, -0.5, 0.25, 2.0])).sum().backward()
        return lp.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    ref, ref_grads = run(PLAIN, own=True)
    assert torch.isfinite(ref).all()
    for layout in (PLAIN, PREFIX_SHARED, PACKED, PACKED_UNSHARED):
        got, grads = run(layout)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"{family} {layout}")
        for g, e in zip(grads, ref_grads):  # fp32 sums in another order: 1e-5 of the tensor's own scale
            scale = max(1.0, float(e.abs().max()))
            torch.testing.assert_close(g, e, atol=1e-5 * scale, rtol=1e-4, msg=f"{family} {layout} gradient")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_bf16_within_the_text_paths_tolerance(family):
    model, processor = _family(family)
    model = model.to(torch.bfloat16)
    prompts, completions, parts = _pairs(processor)
    parts = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in p.items()} for p in parts]
    pad = processor.tokenizer.pad_token_id or 0
    plan = engine_plan(model)
    with torch.no_grad():
        ref = _logps(model, _batch(PLAIN, prompts, completions, parts, pad), _own_plan(model), full_logits=True)
        atol, rtol = LOW_PRECISION_TOLERANCE
        for layout in (PREFIX_SHARED, PACKED):
            got = _logps(model, _batch(layout, prompts, completions, parts, pad), plan)
            # per sequence: the per-token tolerance times the number of scored tokens
            n = torch.tensor([len(c) for comp in completions for c in comp], dtype=torch.float32)
            assert ((got - ref).abs() <= n * atol + rtol * ref.abs()).all(), (family, layout, got, ref)


@pytest.mark.parametrize("family,broken", [("qwen2_vl", "positions"), ("gemma3", "blocks"),
                                           ("llava", "image order")])
def test_the_matrix_can_fail(family, broken):
    """Break one thing the vision plan or the batch gets right and the comparison must see it: 1-D positions for
    Qwen2-VL's multimodal rotary ones, no bidirectional image blocks for Gemma 3, the two pairs' images swapped."""
    model, processor = _family(family)
    prompts, completions, parts = _pairs(processor, images_per_pair=(1, 1))
    pad = processor.tokenizer.pad_token_id or 0
    plan = engine_plan(model)
    assert plan.vision is not None
    with torch.no_grad():
        ref = _logps(model, _batch(PLAIN, prompts, completions, parts, pad), _own_plan(model), full_logits=True)
        batch = _batch(PREFIX_SHARED, prompts, completions, parts, pad)
        torch.testing.assert_close(_logps(model, batch, plan), ref, atol=1e-5, rtol=0)
        saved = (plan.vision.positions, plan.vision.blocks)
        try:
            if broken == "positions":
                plan.vision.positions = "1d"
            elif broken == "blocks":
                plan.vision.blocks = None
            else:
                batch["vision"] = _images(parts[::-1])
            got = _logps(model, batch, plan)
        finally:
            plan.vision.positions, plan.vision.blocks = saved
    assert (got - ref).abs().max() > 1e-4, (family, broken, got, ref)  # 10x the matrix's tolerance


def test_the_probe_turns_images_to_plain_when_they_differ():
    """The first batch with images is compared with the model's own forward; a wrong vision plan is caught and
    that model's batches with images go back to the plain layout (exact again)."""
    model, processor = _family("qwen2_vl")
    prompts, completions, parts = _pairs(processor, images_per_pair=(1, 1))
    pad = processor.tokenizer.pad_token_id or 0
    plan = engine_plan(model)
    assert plan.vision is not None
    plan.vision.positions = "1d"  # what an unknown family's position rule would look like
    batch = _batch(PREFIX_SHARED, prompts, completions, parts, pad)
    lines = check_images(model, batch, label="policy")
    assert len(lines) == 1 and "with images -> plain" in lines[0], lines
    assert not {PREFIX_SHARED, PACKED} & plan.vision.layouts  # the layout the run uses: packed_unshared untouched
    with torch.no_grad():
        ref = _logps(model, _batch(PLAIN, prompts, completions, parts, pad), _own_plan(model), full_logits=True)
        torch.testing.assert_close(_logps(model, batch, plan), ref, atol=1e-5, rtol=0)
    assert check_images(model, batch, label="policy") == []  # once per model


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3", "gemma3"])
@pytest.mark.parametrize("layout", [PREFIX_SHARED, PACKED, PACKED_UNSHARED])
def test_a_layout_the_model_does_not_take_runs_as_plain_rows_with_their_images(family, layout):
    """Where images step aside (the plan lacks the layout), the batch becomes TRL's plain rows, each sequence with
    its prompt's images: exact again."""
    model, processor = _family(family)
    prompts, completions, parts = _pairs(processor)
    pad = processor.tokenizer.pad_token_id or 0
    plan = engine_plan(model)
    assert plan.vision is not None
    aside = EnginePlan(head=plan.head, layouts=plan.layouts, windows=plan.windows, dict_masks=plan.dict_masks,
                       vision=replace(plan.vision, layouts={PLAIN}))
    with torch.no_grad():
        ref = _logps(model, _batch(PLAIN, prompts, completions, parts, pad), _own_plan(model), full_logits=True)
        got = _logps(model, _batch(layout, prompts, completions, parts, pad), aside)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_the_startup_probe_of_a_vlm_never_draws_an_image_token():
    """The text probe's random tokens skip a VLM's image / video / marker tokens (one of them in text asks for
    pixels the probe does not have, and the model's forward fails); the probe then runs on the VLM."""
    from dpo_lightning.engine.probe import probe_batches, verify
    from dpo_lightning.models.vision_plan import multimodal_token_ids

    batches = probe_batches(12, None, torch.device("cpu"), exclude=set(range(11)))
    assert set(batches[PLAIN]["input_ids"].flatten().tolist()) <= {0, 11}  # 0: padding
    model, _ = _family("gemma3")
    assert len(multimodal_token_ids(model.config)) >= 3  # image soft token, begin and end of image
    assert verify(model, label="policy") == []  # the fast path equals the model's own forward on text
