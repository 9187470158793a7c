"""builtin:shapes (data/shapes.py): generated vision pairs whose answers are right for the drawn image, read back
from the pixels; every row distinct; cached once per arguments; loaded through the data module."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import pytest

from dpo_lightning.data import shapes
from dpo_lightning.data.formats import load_records, resolve_builtin


def _components(img) -> list[list[tuple[int, int]]]:
    """4-connected runs of non-background pixels."""
    w, h = img.size
    px = img.load()
    seen: set[tuple[int, int]] = set()
    out = []
    for y in range(h):
        for x in range(w):
            if (x, y) in seen or px[x, y] == shapes.BACKGROUND:
                continue
            stack, comp = [(x, y)], []
            seen.add((x, y))
            while stack:
                cx, cy = stack.pop()
                comp.append((cx, cy))
                for nx, ny in ((cx + 1, cy), (cx - 1, cy), (cx, cy + 1), (cx, cy - 1)):
                    if 0 <= nx < w and 0 <= ny < h and (nx, ny) not in seen and px[nx, ny] != shapes.BACKGROUND:
                        seen.add((nx, ny))
                        stack.append((nx, ny))
            out.append(comp)
    return out


def _kind(comp) -> str:
    """The shape of a component from how much of its bounding box it fills: square 1, circle pi/4, triangle 1/2."""
    xs, ys = [p[0] for p in comp], [p[1] for p in comp]
    fill = len(comp) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
    return "square" if fill > 0.93 else "circle" if fill > 0.66 else "triangle"


def _answer(row) -> str:
    return row["chosen"][0]["content"][0]["text"]


def test_rows_are_distinct_and_answers_match_the_pixels(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("DPO_LIGHTNING_CACHE", str(tmp_path))
    path = shapes.materialize(n_pairs=90, seed=3, image_size=48)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 90
    images = [(path.parent / r["images"][0]).read_bytes() for r in rows]
    assert len({hashlib.sha256(b).hexdigest() for b in images}) == 90  # distinct pictures
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == 90
    questions = Counter()
    for row, data in zip(rows, images):
        question = row["prompt"][0]["content"][1]["text"]
        kind = next(k for k, q in shapes.QUESTIONS.items() if q == question)
        questions[kind] += 1
        assert row["prompt"][0]["content"][0] == {"type": "image"}
        right, wrong = _answer(row), row["rejected"][0]["content"][0]["text"]
        assert right != wrong and {right, wrong} <= set(shapes.ANSWERS[kind])
        img = Image.open(io.BytesIO(data)).convert("RGB")
        assert img.size == (48, 48)
        comps = _components(img)
        colours = {img.getpixel(p) for c in comps for p in c}
        assert len(colours) == 1  # one colour, drawn without antialiasing
        kinds = {_kind(c) for c in comps}
        assert len(kinds) == 1
        truth = {"colour": next(n for n, rgb in shapes.COLOURS.items() if rgb in colours), "shape": kinds.pop(),
                 "count": shapes.COUNTS[len(comps) - 1]}
        assert truth[kind] == right, (row, truth)
    assert set(questions.values()) == {30}


def test_cached_by_arguments_and_resolved_as_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LIGHTNING_CACHE", str(tmp_path))
    a = shapes.materialize(n_pairs=12, seed=0, image_size=32)
    mtime = a.stat().st_mtime_ns
    assert shapes.materialize(n_pairs=12, seed=0, image_size=32) == a and a.stat().st_mtime_ns == mtime
    b = shapes.materialize(n_pairs=12, seed=1, image_size=32)
    assert b != a and b.read_text() != a.read_text()
    assert not list(tmp_path.rglob(".tmp-*"))  # published atomically, nothing left behind
    assert resolve_builtin("builtin:shapes") == shapes.materialize()
    assert len(load_records("builtin:shapes")) == 720
    assert resolve_builtin("builtin:default_prefs").name == "default_prefs.jsonl"  # unchanged


def test_words_are_in_the_tiny_vlm_vocabulary():
    tiny_vlm = pytest.importorskip("dpo_lightning.models.tiny_vlm")
    words = {w for q in shapes.QUESTIONS.values() for w in q.split()}
    words |= {a for answers in shapes.ANSWERS.values() for a in answers}
    assert words <= set(tiny_vlm.vocab()), words - set(tiny_vlm.vocab())
