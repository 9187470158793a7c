"""Vision preference data: every image form, the vision validation reasons, image-safe truncation, the cache
keyed by image bytes, the vision batch (order per layout, equal to the processor's own output) and TRL parity.

Uses the tiny vision-language models of ``models/tiny_vlm.py`` (skipped where it or transformers >= 5 is absent;
families whose processors need torchvision skip without it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys

import numpy as np
import pytest
from helpers import requires_vision

pytestmark = requires_vision
tiny_vlm = pytest.importorskip("dpo_lightning.models.tiny_vlm")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dpo_lightning.data import images as imgs  # noqa: E402
from dpo_lightning.data.cache import tokenize_source  # noqa: E402
from dpo_lightning.data.collate import PreferenceCollator, UnpairedCollator  # noqa: E402
from dpo_lightning.data.formats import DataError  # noqa: E402
from dpo_lightning.data.layouts import LAYOUTS  # noqa: E402
from dpo_lightning.data.tokenize import TruncationConfig, truncate  # noqa: E402
from dpo_lightning.data.validate import DataValidator  # noqa: E402
from dpo_lightning.data.vision_collate import image_order, pixel_inputs  # noqa: E402

TORCHVISION_FAMILIES = {"qwen2_vl", "qwen2_5_vl", "smolvlm", "mistral3"}
_PROCESSORS: dict = {}


def processor(family: str = "llava"):
    if family in TORCHVISION_FAMILIES:
        pytest.importorskip("torchvision")
    if family not in _PROCESSORS:
        _PROCESSORS[family] = tiny_vlm.build(family)[1]
    return _PROCESSORS[family]


def png(colour=(200, 10, 10), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def conv_row(images, question="what colour is the shape ?"):
    return {"images": images, "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tokenize(path, proc, tmp_path, cfg=None, validation=None, **kw):
    validator = DataValidator(validation)
    rows, _, _ = tokenize_source(str(path), "train", proc, cfg or TruncationConfig(256), validator=validator,
                                 num_proc=1, cache_dir=str(tmp_path / "cache"), progress=False, **kw)
    return rows, validator


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(imgs.decode(data).convert("RGB"))


# ------------------------------------------------------------------ image forms
def test_every_image_form_gives_the_same_tokens_and_pixels(tmp_path):
    import datasets

    proc = processor()
    data = png()
    (tmp_path / "red.png").write_bytes(data)
    b64 = base64.b64encode(data).decode()
    forms = {"path": "red.png", "absolute": str(tmp_path / "red.png"), "base64": b64,
             "data_url": "data:image/png;base64," + b64, "dict": {"bytes": None, "path": "red.png"}}
    jsonl = write_jsonl(tmp_path / "forms.jsonl", [conv_row([v]) for v in forms.values()])
    rows, _ = tokenize(jsonl, proc, tmp_path, validation={"duplicate_pair": "keep"})
    assert len(rows) == len(forms) and rows.vision
    ref = rows[0]
    for r in rows:
        assert r["prompt_ids"] == ref["prompt_ids"] and r["images"] == [data]  # the file's own bytes

    pil = Image.open(io.BytesIO(data)).convert("RGB")
    base = conv_row(None)
    cols = {k: [base[k]] * 3 for k in ("prompt", "chosen", "rejected")}
    saved = {  # PIL images (an Image feature), raw bytes cast to Image(), and a single `image` column
        "pil": datasets.Dataset.from_dict({"images": [[pil]] * 3, **cols}),
        "bytes": datasets.Dataset.from_dict({"image": [data] * 3, **cols}).cast_column("image", datasets.Image()),
        "dicts": datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None}] * 3, **cols}).cast_column(
            "image", datasets.Image()),
    }
    for name, ds in saved.items():
        ds.save_to_disk(str(tmp_path / name))
        got, _ = tokenize(tmp_path / name, proc, tmp_path, validation={"duplicate_pair": "keep"})
        assert [r["prompt_ids"] for r in got] == [ref["prompt_ids"]] * 3, name
        assert (pixels(got[0]["images"][0]) == pixels(data)).all(), name


def test_multi_image_and_text_only_rows_in_one_file(tmp_path):
    proc = processor()
    a, b = png(), png((10, 10, 200), (24, 50))
    rows = [conv_row([base64.b64encode(a).decode(), base64.b64encode(b).decode()], "what colour is the shape ?"),
            {"images": [base64.b64encode(a).decode()], "prompt": "what <image> colour ?", "chosen": "red",
             "rejected": "blue"},
            {"images": [], "prompt": "what colour is it ?", "chosen": "red", "rejected": "blue"},
            {"prompt": "what shape is it ?", "chosen": "circle", "rejected": "square"}]
    got, _ = tokenize(write_jsonl(tmp_path / "mixed.jsonl", rows), proc, tmp_path)
    image = proc.image_token_id
    assert [r["images"] for r in got] == [[a, b], [a], [], []]
    n1 = got[1]["prompt_ids"].count(image)
    assert n1 > 0 and got[0]["prompt_ids"].count(image) == 2 * n1
    assert image not in got[2]["prompt_ids"] + got[3]["prompt_ids"]
    text = proc.tokenizer(text="what colour is it ?", add_special_tokens=False)["input_ids"]
    assert got[2]["prompt_ids"] == text  # no image: the processor gives the text's own ids
    assert got[2]["chosen_ids"] == proc.tokenizer(text="red", add_special_tokens=False)["input_ids"]  # no EOS (TRL)
    batch = PreferenceCollator(0, layout="plain", processor=proc)([got[2], got[3]])
    assert "vision" not in batch  # a batch without images is the text batch
    assert batch.keys() == PreferenceCollator(0, layout="plain")([got[2], got[3]]).keys()


# ------------------------------------------------------------------ validation reasons
@pytest.mark.parametrize("bad, field", [("missing.png", "images[1]"), ("@@@not-base64@@@", "images[1]"),
                                        (base64.b64encode(b"not an image at all").decode(), "images[1]")])
def test_image_unreadable_errors_naming_file_row_and_field(tmp_path, bad, field):
    ok = base64.b64encode(png()).decode()
    path = write_jsonl(tmp_path / "bad.jsonl", [conv_row([ok]), conv_row([ok, bad], "what shape is it ?")])
    with pytest.raises(DataError, match=rf"bad.jsonl: row 1: field '{re.escape(field)}'.*image_unreadable"):
        tokenize(path, processor(), tmp_path)
    rows, v = tokenize(path, processor(), tmp_path, validation={"image_unreadable": "drop"})
    assert len(rows) == 1
    v.write_report(tmp_path / "data_report.json")
    report = json.loads((tmp_path / "data_report.json").read_text())
    entry = report["sources"][str(path)]["by_reason"]["image_unreadable"]
    assert entry == {"count": 1, "policy": "drop", "rows": [1]}


def test_image_count_mismatch_and_budget(tmp_path):
    proc = processor()
    ok = base64.b64encode(png()).decode()
    rows = [conv_row([ok]),
            {"images": [ok, ok], "prompt": "what <image> colour ?", "chosen": "red", "rejected": "blue"},
            {"images": [ok], "prompt": [{"role": "user", "content": [{"type": "text", "text": "what ?"}]}],
             "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "no"}]}]
    path = write_jsonl(tmp_path / "count.jsonl", rows)
    with pytest.raises(DataError, match=r"row 1: field 'prompt': 1 '<image>' placeholders for 2 image\(s\).*"
                                        r"image_count_mismatch"):
        tokenize(path, proc, tmp_path)
    got, v = tokenize(path, proc, tmp_path, validation={"image_count_mismatch": "drop"})
    assert len(got) == 1 and v.report["sources"][str(path)]["by_reason"]["image_count_mismatch"]["rows"] == [1, 2]

    n = got[0]["prompt_ids"].count(proc.image_token_id)
    text_row = {"images": [], "prompt": "what ?", "chosen": "red", "rejected": "blue"}
    budget = write_jsonl(tmp_path / "budget.jsonl", [conv_row([ok]), conv_row([ok], "what shape is it ?"), text_row])
    got, v = tokenize(budget, proc, tmp_path, cfg=TruncationConfig(max_length=n))
    rep = v.report["sources"][str(budget)]
    assert rep["by_reason"]["image_tokens_exceed_budget"] == {"count": 2, "policy": "drop", "rows": [0, 1]}
    assert [r["index"] for r in got] == [2]
    with pytest.raises(DataError, match=r"row 0: field 'prompt': its \d+ image tokens leave no room"):
        tokenize(budget, proc, tmp_path, cfg=TruncationConfig(max_length=n),
                 validation={"image_tokens_exceed_budget": "error"})


# ------------------------------------------------------------------ truncation never cuts an image
def _runs(ids, image_ids):
    return [t for t in ids if t in image_ids]


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_keeps_every_image_token(tmp_path, mode):
    proc = processor()
    ids = imgs.image_token_ids(proc)
    odd = base64.b64encode(png(size=(37, 23))).decode()
    question = " ".join(["what colour is the shape"] * 6) + " ?"
    rows = [{"images": [odd, odd], "prompt": f"{question} <image> {question} <image> {question}",
             "chosen": " ".join(["red"] * 30), "rejected": "blue"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    full, _ = tokenize(path, proc, tmp_path, cfg=TruncationConfig(None))
    p = full[0]["prompt_ids"]
    n_image = sum(imgs.protected_positions(p, ids))
    text = len(p) - n_image
    got, _ = tokenize(path, proc, tmp_path, cfg=TruncationConfig(None, max_prompt_length=10, truncation_mode=mode))
    q = got[0]["prompt_ids"]
    assert _runs(q, ids) == _runs(p, ids) and len(q) - n_image == 10  # counts text tokens only
    kept = [t for t, m in zip(p, imgs.protected_positions(p, ids)) if not m]
    assert [t for t, m in zip(q, imgs.protected_positions(q, ids)) if not m] == (
        kept[:10] if mode == "keep_start" else kept[-10:])
    limit = n_image + text // 2 + 5
    if mode == "keep_start":  # the prompt is never cut for max_length in keep_start (as for text rows)
        with pytest.raises(DataError, match="every row was dropped"):
            tokenize(path, proc, tmp_path, cfg=TruncationConfig(limit, truncation_mode=mode))
        limit = len(p) + 3
    got, _ = tokenize(path, proc, tmp_path, cfg=TruncationConfig(limit, truncation_mode=mode))
    r = got[0]  # keep_end: the oldest text tokens go, the images stay, the longer completion fits
    assert _runs(r["prompt_ids"], ids) == _runs(p, ids) and len(r["prompt_ids"]) >= n_image
    assert len(r["prompt_ids"]) + len(r["chosen_ids"]) <= limit
    assert r["chosen_ids"] == full[0]["chosen_ids"][: limit - len(r["prompt_ids"])]


def test_truncate_unit_keeps_spans():
    image = frozenset({9, 8})
    prompt = [1, 2, 8, 9, 9, 8, 3, 4, 8, 9, 8, 5]
    cfg = TruncationConfig(None, max_prompt_length=2, truncation_mode="keep_end")
    p, cs = truncate(prompt, [[7, 7]], cfg, image)
    assert p == [2, 8, 9, 9, 8, 3, 4, 8, 9, 8, 5]  # "3 4" lies between two image runs: kept with them
    assert [t for t in p if t in image] == [t for t in prompt if t in image]
    assert truncate(prompt, [[7]], TruncationConfig(7), image) == (None, "image_tokens_exceed_budget")
    p, cs = truncate(prompt, [[7] * 10], TruncationConfig(12, truncation_mode="keep_end"), image)
    assert [t for t in p if t in image] == [t for t in prompt if t in image] and len(p) + len(cs[0]) <= 12


# ------------------------------------------------------------------ cache keyed by image bytes
def test_cache_key_by_image_bytes_not_path(tmp_path):
    proc = processor()
    (tmp_path / "a.png").write_bytes(png())
    path = write_jsonl(tmp_path / "c.jsonl", [conv_row(["a.png"])])
    first, _ = tokenize(path, proc, tmp_path)
    (tmp_path / "a.png").rename(tmp_path / "b.png")
    write_jsonl(path, [conv_row(["b.png"])])
    moved, _ = tokenize(path, proc, tmp_path)
    assert moved.folder == first.folder  # same bytes at another path: a hit
    (tmp_path / "b.png").write_bytes(png((0, 200, 0)))
    changed, _ = tokenize(path, proc, tmp_path)
    assert changed.folder != first.folder and changed[0]["images"] == [png((0, 200, 0))]


# ------------------------------------------------------------------ the vision batch
def _image_token_runs(input_ids: torch.Tensor, image_id: int) -> list[int]:
    """Lengths of the runs of image tokens, rows read left to right, top to bottom."""
    runs, n = [], 0
    for t in input_ids.flatten().tolist() + [-1]:
        if t == image_id:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


FAMILIES = ["llava", "qwen2_vl", "idefics3", "gemma3", "llava_next"]


@pytest.mark.parametrize("family", FAMILIES)
def test_collate_order_and_equality(tmp_path, family):
    proc = processor(family)
    sizes = [(40, 30), (24, 50), (64, 20)]
    data = [png((30 * i, 10, 200 - 30 * i), s) for i, s in enumerate(sizes)]
    ph = imgs.placeholder(proc)  # text prompts: a word between two images keeps their token runs apart
    enc = [base64.b64encode(d).decode() for d in data]
    rows = [{"images": enc[:1], "prompt": f"{ph} what colour is the shape ?", "chosen": "red", "rejected": "blue"},
            {"images": enc[1:], "prompt": f"{ph} and {ph} what shape is it ?", "chosen": "a circle",
             "rejected": "square"},
            {"images": [], "prompt": "what colour is it ?", "chosen": "red", "rejected": "blue"}]
    got, _ = tokenize(write_jsonl(tmp_path / "f.jsonl", rows), proc, tmp_path)
    batch_rows = list(got)
    image_id = proc.image_token_id if family != "gemma3" else proc.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    one_image_tokens = {}
    for d in data:  # image tokens of each image alone, from the processor
        text = imgs.placeholder(proc)
        one = proc(images=[imgs.decode(d)], text=[text], add_special_tokens=False)
        one_image_tokens[d] = list(one["input_ids"][0]).count(image_id)
    per_prompt = [r["images"] for r in batch_rows]
    for layout in LAYOUTS:
        batch = PreferenceCollator(proc.tokenizer.pad_token_id, layout=layout, processor=proc)(batch_rows)
        order = image_order(layout, per_prompt, 2)
        assert len(order) == {"plain": 6, "packed_unshared": 6}.get(layout, 3)
        assert _image_token_runs(batch["input_ids"], image_id) == [one_image_tokens[d] for d in order], layout
        expected = proc(images=[[imgs.decode(d) for d in order]] if "Idefics" in type(proc).__name__ else
                        [imgs.decode(d) for d in order], return_tensors="pt")
        for key, value in batch["vision"].items():  # equal to the processor's own call on the same images
            assert torch.equal(value, expected[key]), (layout, key)
        for key in ("token_type_ids", "mm_token_type_ids"):
            if key in batch:  # 1 exactly on the image tokens, 0 on padding
                assert torch.equal(batch[key].bool(), batch["input_ids"].eq(image_id) & batch["attention_mask"].bool())
    if family in ("gemma3", "qwen2_vl"):  # the type ids equal the processor's own on the prompt
        key = "token_type_ids" if family == "gemma3" else "mm_token_type_ids"
        from dpo_lightning.data.tokenize import render_vision

        prompt, _ = render_vision(proc, rows[1]["prompt"], [rows[1]["chosen"]], 2)
        own = proc(images=[imgs.decode(d) for d in per_prompt[1]], text=[prompt], add_special_tokens=False)
        batch = PreferenceCollator(proc.tokenizer.pad_token_id, layout="plain", processor=proc)(batch_rows)
        n = len(batch_rows[1]["prompt_ids"])
        assert batch[key][1, :n].tolist() == list(own[key][0])
    if family == "llava":  # the model's forward sees the same images either way: plain == prefix_shared pixels
        model = tiny_vlm.build(family)[0].eval()
        plain = PreferenceCollator(proc.tokenizer.pad_token_id, layout="plain", processor=proc)(batch_rows[:1])
        with torch.no_grad():
            logits = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"],
                           **plain["vision"]).logits
        assert torch.isfinite(logits).all()


def test_unpaired_collator_images(tmp_path):
    proc = processor()
    a = png()
    rows = [{"index": 0, "prompt_ids": [5, proc.image_token_id, 6], "completion_ids": [7], "label": True,
             "images": [a]},
            {"index": 1, "prompt_ids": [5, 6], "completion_ids": [8], "label": False, "images": []}]
    batch = UnpairedCollator(0, kl_pairs=True, layout="plain", processor=proc)(rows)
    assert batch["vision"]["pixel_values"].shape[0] == 2  # prompt 0's image for its row and its KL row
    assert torch.equal(batch["vision"]["pixel_values"], pixel_inputs(proc, [a, a])["pixel_values"])


# ------------------------------------------------------------------ the datamodule with a processor
def test_datamodule_takes_a_processor(tmp_path):
    from dpo_lightning.data.datamodule import PreferenceDataModule

    proc = processor()
    ok = base64.b64encode(png()).decode()
    path = write_jsonl(tmp_path / "dm.jsonl", [conv_row([ok], q) for q in ("what colour is the shape ?",
                                                                           "what shape is it ?", "what is it ?")])
    dm = PreferenceDataModule(str(path), proc, batch_size=3, cache_dir=str(tmp_path / "cache"), num_proc=1,
                              max_length=128)
    dm.setup()
    assert dm.tokenizer is proc.tokenizer and dm.processor is proc
    batch = next(iter(dm.train_dataloader()))
    assert batch["vision"]["pixel_values"].shape[0] == 3  # prefix_shared: each pair's image once
    lengths = dm.row_lengths(dm.train_rows)  # the image tokens count (they are in prompt_ids)
    r = dm.train_rows[0]
    assert lengths[0] == len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
    assert r["prompt_ids"].count(proc.image_token_id) > 0


# ------------------------------------------------------------------ TRL parity
def _trl():
    if os.environ.get("TRL_SITE_PACKAGES") and os.environ["TRL_SITE_PACKAGES"] not in sys.path:
        sys.path.append(os.environ["TRL_SITE_PACKAGES"])
    trl = pytest.importorskip("trl")
    if not trl.__version__.startswith("1.16"):
        pytest.skip(f"parity is pinned to TRL 1.16 (found {trl.__version__})")
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    return DataCollatorForVisionPreference


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
@pytest.mark.parametrize("kind", ["conversational", "text"])
def test_ids_equal_trl(tmp_path, family, kind):
    collator_cls = _trl()
    proc = processor(family)
    a, b = png(), png((10, 10, 200), (24, 50))
    ph = imgs.placeholder(proc)
    if family == "qwen2_vl":
        ph = "<|vision_start|><|image_pad|><|vision_end|>"
    if kind == "conversational":
        rows = [conv_row([a]), conv_row([a, b], "what shape is it ?")]
    else:
        rows = [{"images": [a], "prompt": f"{ph} what colour is the shape ?", "chosen": "red", "rejected": "blue"},
                {"images": [a, b], "prompt": f"{ph} {ph} what shape is it ?", "chosen": "a circle",
                 "rejected": "square"}]
    stored = [{**r, "images": [base64.b64encode(x).decode() for x in r["images"]]} for r in rows]
    got, _ = tokenize(write_jsonl(tmp_path / "p.jsonl", stored), proc, tmp_path)
    examples = [{**r, "images": [imgs.decode(x) for x in r["images"]]} for r in rows]
    trl_batch = collator_cls(proc)(examples)
    ours = PreferenceCollator(proc.tokenizer.pad_token_id, layout="plain", processor=proc)(list(got))
    for i in range(4):  # TRL: flushed left, completion_mask marks the completion
        mask = trl_batch["attention_mask"][i].bool()
        ids = trl_batch["input_ids"][i][mask].tolist()
        row = got[i % 2]
        comp = row["chosen_ids"] if i < 2 else row["rejected_ids"]
        assert ids == row["prompt_ids"] + comp, (family, kind, i)
        assert trl_batch["completion_mask"][i][mask].tolist() == [0] * len(row["prompt_ids"]) + [1] * len(comp)
    for key, value in ours["vision"].items():
        assert torch.equal(value, trl_batch[key]), key

