"""Generated vision preference pairs (``data.path=builtin:shapes``): coloured shapes on a plain background.

    path = materialize(n_pairs=720, seed=0, image_size=64)   # <cache>/builtin/shapes-<key>/shapes.jsonl + img/

Each image holds one kind of shape (circle, square or triangle) in one colour (red, green, blue, yellow, purple,
orange): a single shape for colour and shape questions, one to three for count questions, at random positions and
sizes, never overlapping, on white. Each row asks one question in TRL's vision format; ``chosen`` is the right
answer, ``rejected`` a wrong one of the same kind:

    {"images": ["img/000123.png"],
     "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the shape ?"}]}],
     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]}

Every word is in the tiny vision model's vocabulary (``models/tiny_vlm.SHAPE_WORDS``). Images are drawn with PIL
(no antialiasing: a shape's pixels are exactly its colour) and saved as PNG; no two images have the same bytes, so
no two rows are the same and a held-out row is never a training row. The folder is built once per
(n_pairs, seed, image_size) into the disk cache (``files/disk_cache.py``) and published atomically.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_lightning.files import disk_cache

VERSION = "shapes-2"  # bump when the drawing or the rows change: a new cache entry
FILE = "shapes.jsonl"
BACKGROUND = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (235, 215, 20), "purple": (140, 40, 170), "orange": (250, 140, 20)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
QUESTIONS = {"colour": "what colour is the shape ?", "shape": "what shape is in the image ?",
             "count": "how many are there in the image ?"}
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS}


@dataclass(frozen=True)
class Scene:
    """What one image shows: ``boxes`` are (left, top, side) squares each shape is drawn into."""

    kind: str
    colour: str
    boxes: tuple[tuple[int, int, int], ...]

    def answer(self, question: str) -> str:
        return {"colour": self.colour, "shape": self.kind, "count": COUNTS[len(self.boxes) - 1]}[question]


def _boxes(rng: random.Random, n: int, image_size: int) -> tuple[tuple[int, int, int], ...]:
    """``n`` non-overlapping squares (2 pixels apart at least) inside the image. Shapes are large for the size of
    the picture (a single one most of it; several, each about a quarter), so that a tiny model that sees the
    picture at a few patches a side can still tell a circle's corners from a square's and count blobs."""
    lo, hi = (image_size * 11 // 16, image_size * 14 // 16) if n == 1 else (image_size * 6 // 16,
                                                                           image_size * 7 // 16)
    while True:
        boxes: list[tuple[int, int, int]] = []
        for _ in range(50 * n):
            side = rng.randint(lo, hi)
            x, y = rng.randint(1, image_size - side - 1), rng.randint(1, image_size - side - 1)
            if all(x + side + 2 <= bx or bx + bs + 2 <= x or y + side + 2 <= by or by + bs + 2 <= y
                   for bx, by, bs in boxes):
                boxes.append((x, y, side))
                if len(boxes) == n:
                    return tuple(boxes)


def draw(scene: Scene, image_size: int):
    """The PIL image of ``scene``."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    pen = ImageDraw.Draw(img)
    fill = COLOURS[scene.colour]
    for x, y, s in scene.boxes:
        if scene.kind == "circle":
            pen.ellipse([x, y, x + s - 1, y + s - 1], fill=fill)
        elif scene.kind == "square":
            pen.rectangle([x, y, x + s - 1, y + s - 1], fill=fill)
        else:  # pointing up: half of its box
            pen.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=fill)
    return img


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _message(role: str, *parts: dict[str, str]) -> list[dict[str, Any]]:
    return [{"role": role, "content": list(parts)}]


def generate(n_pairs: int, seed: int, image_size: int) -> list[tuple[dict[str, Any], Scene, bytes]]:
    """``n_pairs`` (row, scene, PNG bytes), the questions in turn (colour, shape, count), every image distinct."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[tuple[dict[str, Any], Scene, bytes]] = []
    while len(out) < n_pairs:
        question = tuple(QUESTIONS)[len(out) % len(QUESTIONS)]
        n = rng.randint(1, 3) if question == "count" else 1
        scene = Scene(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), _boxes(rng, n, image_size))
        data = _png(draw(scene, image_size))
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:  # the same picture again: draw another
            continue
        seen.add(digest)
        right = scene.answer(question)
        wrong = rng.choice([a for a in ANSWERS[question] if a != right])
        row = {"images": [f"img/{len(out):06d}.png"],
               "prompt": _message("user", {"type": "image"}, {"type": "text", "text": QUESTIONS[question]}),
               "chosen": _message("assistant", {"type": "text", "text": right}),
               "rejected": _message("assistant", {"type": "text", "text": wrong})}
        out.append((row, scene, data))
    return out


def write(folder: Path, n_pairs: int, seed: int, image_size: int) -> Path:
    """Write ``shapes.jsonl`` and ``img/`` into ``folder``; returns the JSONL file."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for row, _, data in generate(n_pairs, seed, image_size):
        (folder / row["images"][0]).write_bytes(data)
        lines.append(json.dumps(row) + "\n")
    (folder / FILE).write_text("".join(lines))
    return folder / FILE


def materialize(n_pairs: int = 720, seed: int = 0, image_size: int = 64) -> Path:
    """The JSONL file of the generated pairs, built once into the disk cache (temp folder + rename)."""
    if n_pairs < 1 or image_size < 32:
        raise ValueError(f"shapes: n_pairs={n_pairs} must be >= 1 and image_size={image_size} >= 32")
    key = disk_cache.cache_key(n_pairs, seed, image_size, version=VERSION, length=12)
    target = disk_cache.cache_root(None, "builtin") / f"shapes-{key}"
    if (target / FILE).is_file():
        return target / FILE
    tmp = disk_cache.staging_folder(target)
    try:
        write(tmp, n_pairs, seed, image_size)
        # another process that won the race wrote an identical copy: keep theirs
        disk_cache.publish_folder(tmp, target, complete=lambda entry: (entry / FILE).is_file())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target / FILE
