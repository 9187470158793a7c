"""Vision-language models through the whole path a user takes: a JSONL file with images, the data module with the
model's processor, the collator in every layout, the module's engine, and a Lightning fit in plain Python.

The oracle is the model's own forward on TRL's plain rows of the same collated data (each image twice)."""

from __future__ import annotations

import io
import json

import lightning as L
import pytest
import torch
from helpers import needs_for_family, requires_vision, vision_family_params
from PIL import Image, ImageDraw

from dpo_lightning import PreferenceDataModule, PreferenceLitModule
from dpo_lightning.data.layouts import LAYOUTS, PLAIN
from dpo_lightning.engine.logprobs import sequence_logps
from dpo_lightning.models import tiny_vlm
from dpo_lightning.models.quirks import EnginePlan, engine_plan

pytestmark = requires_vision

# the eight (LLaVA-NeXT and OneVision both) and more
FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "gemma3",
            "mistral3", "paligemma", "qwen3_vl", "aya_vision", "internvl"]
COLOURS = ["red", "green", "blue", "yellow"]


def _png(colour: str, size=(40, 32)) -> bytes:
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).ellipse([3, 3, size[0] - 4, size[1] - 4], fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_pairs(folder, n: int = 6):
    """n pairs: one image each (a file beside the data), the second pair two images, the last a text-only row."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        names = []
        for k in range(0 if i == n - 1 else 2 if i == 1 else 1):
            name = f"img/{i}_{k}.png"
            (folder / name).write_bytes(_png(colour, (40 + 8 * k, 32 + 4 * i)))
            names.append(name)
        content = [{"type": "image"} for _ in names] + [{"type": "text", "text": "what colour is the shape ?"}]
        rows.append({"images": names, "prompt": [{"role": "user", "content": content}],
                     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": colour}]}],
                     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "purple"}]}]})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folders = {}

    def get(family):
        if family not in folders:
            needs_for_family(family)
            folders[family] = tiny_vlm.save(family, tmp_path_factory.mktemp(family))
        return folders[family]
    return get


def _batch(dm: PreferenceDataModule, layout: str):
    return dm.collator(layout)(list(dm.train_rows))


@pytest.mark.parametrize("family", vision_family_params(FAMILIES))
def test_collated_layouts_match_the_models_own_forward(family, saved, tmp_path):
    module = PreferenceLitModule(model={"name_or_path": str(saved(family))}, loss="sigmoid")
    model = module.policy.eval()
    processor = module_processor(saved(family))
    dm = PreferenceDataModule(str(write_pairs(tmp_path)), processor, batch_size=8, val_fraction=0.0,
                              cache_dir=str(tmp_path / "cache"), num_proc=1, max_length=512)
    dm.setup("fit")
    assert len(dm.train_rows) == 6
    plan = engine_plan(model)
    own = EnginePlan(head=None, layouts={PLAIN}, vision=plan.vision)
    with torch.no_grad():
        plain = _batch(dm, PLAIN)
        ref = sequence_logps(model, plain, plain["num_sequences"], plan=own, full_logits=True).logps
        assert torch.isfinite(ref).all()
        for layout in LAYOUTS:
            batch = _batch(dm, layout)
            got = sequence_logps(model, batch, batch["num_sequences"], plan=plan).logps
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"{family} {layout}")


def module_processor(folder):
    from dpo_lightning.models.hf import ModelSpec, load_tokenizer

    return load_tokenizer(ModelSpec(name_or_path=str(folder)))


def test_plain_lightning_fit_trains_the_language_model_only(saved, tmp_path):
    """A user's own Lightning project: the module and the data module, no Hydra. The vision tower and projector
    stay frozen (``freeze_vision`` default), the language model moves, the probe compares the first batch with
    images, and every image of a pair is encoded once (prefix_shared)."""
    folder = saved("llava")
    module = PreferenceLitModule(model={"name_or_path": str(folder)}, loss="sigmoid",
                                 optimizer={"lr": 1e-2})
    dm = PreferenceDataModule(str(write_pairs(tmp_path)), module_processor(folder), batch_size=3,
                              val_fraction=0.0, cache_dir=str(tmp_path / "cache"), num_proc=1, max_length=512)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    moved = {n for n, p in module.policy.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any("language_model" in n for n in moved), moved
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in moved), moved
    assert engine_plan(module.policy).vision.verified
    losses = [v for k, v in trainer.callback_metrics.items() if k.endswith("loss")]
    assert losses and all(torch.isfinite(v) for v in losses), trainer.callback_metrics


def test_reference_precompute_with_images_equals_the_live_reference_and_is_keyed_by_image_content(saved, tmp_path):
    """TRL refuses precomputed reference log-probs for vision data; here one pass fills them, equal to the live
    reference's, and the cache key follows each image's bytes (rows hold bytes, not paths: a changed image misses)."""
    from dpo_lightning.reference.cache import compute_reference_logps, rows_fingerprint

    folder = saved("qwen2_vl")
    module = PreferenceLitModule(model={"name_or_path": str(folder)}, loss="sigmoid")
    dm = PreferenceDataModule(str(write_pairs(tmp_path / "a")), module_processor(folder), batch_size=4,
                              val_fraction=0.0, cache_dir=str(tmp_path / "cache"), num_proc=1, max_length=512)
    dm.setup("fit")
    rows = list(dm.train_rows)
    cached = compute_reference_logps(module.policy, rows, dm.collator(), batch_size=2)
    batch = dm.collator("plain")(rows)
    with torch.no_grad():
        live = sequence_logps(module.policy.eval(), batch, batch["num_sequences"]).logps
    torch.testing.assert_close(cached["ref_chosen_logps"], live[:6], atol=1e-5, rtol=0)
    torch.testing.assert_close(cached["ref_rejected_logps"], live[6:], atol=1e-5, rtol=0)

    changed = [dict(r) for r in rows]
    changed[0] = {**rows[0], "images": [_png("black")]}
    assert rows_fingerprint(changed) != rows_fingerprint(rows)
