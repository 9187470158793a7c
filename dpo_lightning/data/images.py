"""Images of vision preference rows: read in any form, kept as their encoded bytes, and what a processor knows
about the image tokens it puts in a prompt.

A row's images come from an ``images`` column (a list) or an ``image`` column (one image), TRL's vision format.
Each image may be a ``PIL.Image``, a file path (relative to the data file's folder, or absolute), raw bytes, a
base64 string or ``data:`` URL, or a dict ``{"bytes": ..., "path": ...}`` (the storage form of a ``datasets``
``Image`` feature, also in Parquet). ``resolve_rows`` turns every image into its encoded **bytes** early (a file
keeps its own bytes; a PIL image is encoded as PNG), so rows are picklable and content-addressed (the cache key
hashes the bytes, never a path); an image that cannot be read becomes an ``Unreadable`` marker, which the row
checks (``checks.py``) report as ``image_unreadable`` naming the row and field (``images[1]``).

A *processor* (``transformers.ProcessorMixin`` with an ``image_processor``) is accepted wherever the data side
takes a tokenizer; ``text_tokenizer`` gives its tokenizer, ``image_token_ids`` the ids of every token an image
expands to (the image token itself and the wrappers around its runs), which truncation never removes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_lightning.models.vision import is_processor

IMAGE_COLUMNS = ("images", "image")
# keys the image processors return that no model forward takes (they only size the prompt's image tokens)
NOT_FORWARD = ("rows", "cols", "num_crops", "num_patches", "image_num_patches", "patches_subgrid_size")


@dataclass(frozen=True)
class Unreadable:
    """An image that could not be read; ``detail`` says why (the row checks report it)."""

    detail: str


def has_images(row: Any) -> bool:
    """The row has an ``images`` or ``image`` column (possibly empty)."""
    return isinstance(row, dict) and any(c in row for c in IMAGE_COLUMNS)


def row_images(row: dict) -> list:
    """The row's images as a list (``images``, or ``[image]``); [] when none."""
    if "images" in row:
        value = row["images"]
        if value is None:
            return []
        return list(value) if isinstance(value, (list, tuple)) else [value]
    value = row.get("image")
    return [] if value is None else [value]


def _from_path(path: str, base: Path | None) -> bytes | Unreadable:
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    try:
        return p.read_bytes()
    except OSError as err:
        return Unreadable(f"cannot read the image file {path!r} ({err.strerror or err})")


_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.ASCII)


def _from_string(value: str, base: Path | None) -> bytes | Unreadable:
    """A ``data:`` URL, a file path, or base64 (in that order: an existing file wins)."""
    s = value.strip()
    m = _DATA_URL.match(s)
    if m:
        try:
            return base64.b64decode(s[m.end():], validate=True)
        except (binascii.Error, ValueError):
            return Unreadable("invalid base64 in a data: URL")
    if len(s) < 4096 and "\n" not in s:
        p = Path(s).expanduser()
        p = p if p.is_absolute() or base is None else base / p
        if p.is_file():
            return _from_path(s, base)
    if len(s) >= 16 and _BASE64.fullmatch(s):
        try:
            return base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            pass
    shown = s if len(s) <= 80 else s[:77] + "..."
    return Unreadable(f"{shown!r} is neither a readable image file nor valid base64")


_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}")


def to_bytes(value: Any, base: Path | None = None) -> bytes | Unreadable:
    """One image in any accepted form (module docstring) as its encoded bytes, or ``Unreadable``."""
    if isinstance(value, Unreadable):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return _from_string(value, base)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return to_bytes(value["bytes"], base)
        if value.get("path"):
            return _from_path(str(value["path"]), base)
        return Unreadable("an image dict without 'bytes' or 'path'")
    if isinstance(value, Path):
        return _from_path(str(value), base)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with transformers' vision extra
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(value, Image.Image):
        buf = io.BytesIO()
        try:
            value.save(buf, format="PNG")
        except (OSError, ValueError) as err:
            return Unreadable(f"cannot encode the image ({err})")
        return buf.getvalue()
    return Unreadable(f"not an image: {type(value).__name__}")


def base_folder(source: Any) -> Path | None:
    """The folder image paths are relative to: the data file's folder (a saved ``datasets`` folder: itself)."""
    p = Path(str(source)).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        return p.parent
    return None


def resolve_rows(rows: list, base: Path | None) -> list:
    """Rows with an image column get ``images``: a list of bytes (or ``Unreadable``); the ``image`` column is
    folded into it. Other rows are returned as they are."""
    return [resolve_row(row, base) for row in rows]


def resolve_row(row: Any, base: Path | None) -> Any:
    """One row with its images as bytes (see ``resolve_rows``)."""
    if not has_images(row):
        return row
    images = [to_bytes(v, base) for v in row_images(row)]
    out = {k: v for k, v in row.items() if k not in IMAGE_COLUMNS}
    out["images"] = images
    if "image" in row and "images" not in row:
        out["image_column"] = "image"  # the checks name the field as the data does
    return out


def image_digest(data: bytes | Unreadable) -> str:
    """sha256 of an image's bytes (the cache keys' view of an image); an unreadable one by its detail."""
    if isinstance(data, Unreadable):
        return "unreadable:" + data.detail
    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = to_bytes(data)
        if isinstance(data, Unreadable):
            return "unreadable:" + data.detail
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes):
    """The PIL image of encoded bytes (fully loaded); raises ``OSError``/``ValueError`` when it cannot be."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def check_decodable(data: bytes | Unreadable) -> str | None:
    """None when the bytes decode as an image, else why not."""
    if isinstance(data, Unreadable):
        return data.detail
    try:
        decode(data)
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds (OSError, SyntaxError, DecompressionBomb...)
        return f"cannot decode the image ({type(err).__name__}: {err})"
    return None


# ------------------------------------------------------------------ what a processor knows about image tokens
_WRAPPER_ATTRS = ("boi_token", "eoi_token", "fake_image_token", "global_image_token", "image_start_token",
                  "image_end_token", "vision_start_token", "vision_end_token", "image_break_token",
                  "image_begin_token", "image_sep_token", "start_image_token", "end_image_token")
_WRAPPER_PATTERNS = re.compile(r"(?i)(image|img|vision|row_\d+_col_\d+|fake_token_around)")  # added tokens


def image_token_ids(processor: Any) -> frozenset[int]:
    """Ids of every token an image expands to in a prompt: the image token and the tokens that wrap its runs
    (boi/eoi, ``<fake_token_around_image>``, row/column markers, ``<|vision_start|>``/``<|vision_end|>``...),
    read from the processor's attributes and the tokenizer's added tokens."""
    if not is_processor(processor):
        return frozenset()
    tok = processor.tokenizer
    ids: set[int] = set()
    for attr in ("image_token_id", "image_token_index", "boi_token_id", "eoi_token_id", "image_break_token_id",
                 "image_end_token_id", "vision_start_token_id", "vision_end_token_id"):
        v = getattr(processor, attr, None)
        if isinstance(v, int):
            ids.add(v)
    names = [getattr(processor, a, None) for a in ("image_token", *_WRAPPER_ATTRS)]
    names += [t for t in tok.get_added_vocab() if _WRAPPER_PATTERNS.search(t) and "video" not in t.lower()]
    sequence = getattr(processor, "full_image_sequence", None)  # Gemma 3: boi, the soft tokens, eoi
    if isinstance(sequence, str):
        special = set(tok.all_special_ids)
        ids.update(i for i in tok(text=sequence, add_special_tokens=False)["input_ids"] if i in special)
    unk = tok.unk_token_id
    for name in names:
        if isinstance(name, str) and name:
            i = tok.convert_tokens_to_ids(name)
            if isinstance(i, int) and i != unk:
                ids.add(i)
    return frozenset(ids)


def placeholder(processor: Any) -> str | None:
    """The text a text prompt marks an image with: Gemma 3's ``<start_of_image>`` (its ``boi_token``, which the
    processor expands), else the processor's ``image_token`` (``<image>``, ``<|image_pad|>``...)."""
    if hasattr(processor, "full_image_sequence") and getattr(processor, "boi_token", None):
        return processor.boi_token
    return getattr(processor, "image_token", None)


def adds_image_tokens_itself(processor: Any) -> bool:
    """PaliGemma's processor puts the image tokens before a text prompt itself (no placeholder needed)."""
    return "PaliGemma" in type(processor).__name__


def protected_positions(ids: list[int], image_ids: frozenset[int]) -> list[bool]:
    """Per prompt token: part of an image span. Image-related ids, and the short runs of text tokens (at most
    two, e.g. Idefics3's newlines between tile rows) lying between two of them, are protected."""
    mask = [t in image_ids for t in ids]
    marked = [i for i, m in enumerate(mask) if m]
    for a, b in zip(marked, marked[1:]):
        if 1 < b - a <= 3:
            for j in range(a + 1, b):
                mask[j] = True
    return mask
