"""The benchmark's vision shape (``--shape vision``) and what every shape's preparation shares: the model saved once.

    build_vision_model_dir()    ``bench_lib.VISION_SHAPE``'s tiny Qwen2-VL and its processor, saved once
    prepare_vision_rows(...)    generated pairs with images, tokenized by dpo_lightning with that processor
    save_once(target, model, processing_class)   save_pretrained into a temp folder, then rename (a concurrent run
                                that saved the same seeded model first wins)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from bench_lib import VISION_SHAPE, timed_batches, vision_records


def cache_dir() -> Path:
    return Path(os.environ.get("DPO_LIGHTNING_CACHE", Path.home() / ".cache" / "dpo_lightning"))


def save_once(target: Path, model, processing_class) -> Path:
    """``model`` and its tokenizer / processor saved at ``target`` atomically; returns ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(tmp)
    processing_class.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # a concurrent run saved the same seeded model first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_vision_model_dir() -> Path:
    """``VISION_SHAPE``'s tiny Qwen2-VL (seed 0) and its processor, saved once with save_pretrained."""
    from dpo_lightning.models import tiny_vlm

    v = VISION_SHAPE
    digest = hashlib.sha1(json.dumps(v, sort_keys=True).encode()).hexdigest()[:10]
    name = "bench-vlm-{family}-img{image_size}-".format(**v) + digest
    target = cache_dir() / "bench" / name
    if (target / "config.json").exists():
        return target
    model, processor = tiny_vlm.build(v["family"], seed=0, image_size=v["image_size"], **v["text"], **v["vision"])
    model.resize_token_embeddings(v["vocab_size"], mean_resizing=False)  # GPT-2's rows, as the other shapes
    return save_once(target, model, processor)


def prepare_vision_rows(model_dir: Path, max_length: int, batch_size: int, n_batches: int, seed: int, order: str,
                        out: Path) -> dict:
    """``prepare_rows`` for ``--shape vision``: ``batch_size * n_batches`` generated pairs with images (PNG files
    beside ``out``), tokenized by dpo_lightning with the model's processor (TRL 1.16's vision rendering)."""
    from dpo_lightning.data.cache import tokenize_source
    from dpo_lightning.data.tokenize import TruncationConfig
    from dpo_lightning.models.hf import ModelSpec, load_tokenizer

    processor = load_tokenizer(ModelSpec(str(model_dir)))
    records = vision_records(batch_size * n_batches, seed, out.parent / "images")
    source = out.with_suffix(".jsonl")  # every pair is timed: the subset is the whole list
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows, dropped, _ = tokenize_source(str(source), "train", processor, TruncationConfig(max_length), paired=True,
                                       cache_dir=out.parent / "pool-cache", progress=False)
    if len(rows) != len(records) or not rows.vision:
        raise RuntimeError(f"the vision pairs did not all tokenize as vision rows ({len(rows)} of {len(records)}, "
                           f"dropped {dict(dropped)}): is max_length {max_length} below the image tokens?")
    rows = sorted(rows, key=lambda r: r["index"])
    lengths = [len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows]
    ids = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows]
    batches = timed_batches(lengths, batch_size, n_batches, seed + 1, order)
    data = {"records": records, "rows": ids, "batches": batches, "dropped": dict(dropped), "vision": True}
    out.write_text(json.dumps(data))
    return data
