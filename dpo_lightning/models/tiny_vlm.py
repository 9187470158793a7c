"""Built-in tiny image-text-to-text models, made offline from configs and saved with ``save_pretrained``.

``build("qwen2_vl")`` returns a seeded, randomly initialized model of that family (text hidden size 64, two text
layers, a one-layer vision tower of width 32) and a real processor of the family, whose tokenizer is the word-level
tokenizer of ``tiny.py`` over ``vocab()`` plus the family's special tokens (image token, begin/end of image, ...).
The processor's chat template turns each ``{"type": "image"}`` content part into the family's image placeholder,
which the processor then expands into the image tokens the model expects. Images are small by default (a few image
tokens each, one tile, no image splitting); ``image_size`` asks for more. ``materialize("tiny-vlm")`` (the LLaVA
family, which needs only PIL) and ``materialize("tiny-vlm-<family>")`` write a model once into the disk cache, as
``tiny.materialize`` does; every later load goes through ``AutoModelForImageTextToText`` / ``AutoProcessor``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dpo_lightning.files import disk_cache
from dpo_lightning.models import tiny
from dpo_lightning.models.tiny_vlm_families import FAMILY_SPECS, TEXT, VISION

FAMILIES: tuple[str, ...] = tuple(FAMILY_SPECS)
DEFAULT_FAMILY = "llava"  # the embedded default: its processor works with PIL alone (no torchvision)
SHAPE_WORDS = ("red green blue yellow purple orange black white circle square triangle one two three four five "
               "zero six seven eight nine ten what colour color shape is the how many are there in image picture "
               "? . , a an it of and this that which").split()

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}PLACEHOLDER {% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %} </s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def vocab() -> list[str]:
    """``tiny.default_vocab()`` then the words of the generated-shapes data it lacks (the text model's vocabulary,
    and so its cache key, stay as they are)."""
    base = tiny.default_vocab()
    return base + sorted(set(SHAPE_WORDS) - set(base))


def chat_template(family: str) -> str:
    """``tiny.CHAT_TEMPLATE`` for content lists: an image part becomes the family's placeholder."""
    return CHAT_TEMPLATE.replace("PLACEHOLDER", FAMILY_SPECS[family].placeholder)


def build_tokenizer(family: str):
    """The tiny word-level tokenizer over ``vocab()`` with the family's special tokens (named ones become
    attributes such as ``tokenizer.image_token`` and are saved in ``tokenizer_config.json``)."""
    spec = FAMILY_SPECS[family]
    kwargs: dict[str, Any] = {"extra_special_tokens": dict(spec.named)} if spec.named else {}
    tok = tiny.build_tokenizer(vocab(), **kwargs)
    if spec.extra:
        tok.add_special_tokens({"extra_special_tokens": list(spec.extra)}, replace_extra_special_tokens=False)
    tok.chat_template = chat_template(family)
    return tok


def _split(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Overrides for the text config, and ``vision_<key>`` ones for the vision tower's config."""
    text = {**TEXT, **{k: v for k, v in overrides.items() if not k.startswith("vision_")}}
    vision = {**VISION, **{k[len("vision_"):]: v for k, v in overrides.items() if k.startswith("vision_")}}
    return text, vision


def build(family: str, *, seed: int = 0, image_size: int | None = None, **overrides):
    """A seeded random model of ``family`` and its processor: ``(model, processor)``.

    ``image_size`` is the side the processor resizes images to (the family's default gives 4 to 16 image tokens;
    a multiple of 32, or 64 for Qwen3-VL); ``overrides`` change the text config (``hidden_size``, ...) and, with a
    ``vision_`` prefix, the vision tower's (``vision_hidden_size``, ...).
    """
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.utils import is_torchvision_available

    if family not in FAMILY_SPECS:
        raise ValueError(f"unknown tiny vision family {family!r}; available: {', '.join(FAMILIES)}")
    spec = FAMILY_SPECS[family]
    if spec.needs_torchvision and not is_torchvision_available():
        pil_only = ", ".join(f for f in FAMILIES if not FAMILY_SPECS[f].needs_torchvision)
        raise ImportError(f"the {family} processor needs torchvision (pip install 'dpo-lightning[vision]'); "
                          f"families that work with PIL alone: {pil_only}")
    side = image_size or spec.side
    text, vision = _split(overrides)
    config, processor = spec.make(build_tokenizer(family), side, text, vision)
    processor.chat_template = chat_template(family)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.eval()
    return model, processor


def save(family: str, folder: str | Path, **kw) -> Path:
    """``build(family, **kw)``, then ``save_pretrained`` of the model and the processor into ``folder``."""
    folder = Path(folder)
    model, processor = build(family, **kw)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def family_of(name: str) -> str:
    """The family of a built-in name: ``tiny-vlm`` is LLaVA, ``tiny-vlm-<family>`` that family."""
    if name == "tiny-vlm":
        return DEFAULT_FAMILY
    family = name.removeprefix("tiny-vlm-")
    if not name.startswith("tiny-vlm-") or family not in FAMILY_SPECS:
        raise ValueError(f"unknown built-in model 'builtin:{name}'; available: 'builtin:tiny-vlm', "
                         + ", ".join(f"'builtin:tiny-vlm-{f}'" for f in FAMILIES))
    return family


def materialize(name: str = "tiny-vlm", seed: int = 0, **overrides) -> Path:
    """Build ``name`` once into the cache and return its folder (written atomically: temp dir + rename)."""
    import transformers

    family = family_of(name)
    key = disk_cache.cache_key(family, vocab(), seed, TEXT, VISION, overrides, transformers.__version__,
                               version="tiny-vlm-1", length=12)
    target = tiny.cache_root() / "builtin" / f"{name}-{key}"
    if (target / "config.json").exists():
        return target
    tmp = disk_cache.staging_folder(target)
    try:
        save(family, tmp, seed=seed, **overrides)
        # another process that won the race wrote an identical copy: keep theirs
        disk_cache.publish_folder(tmp, target, complete=lambda entry: (entry / "config.json").exists())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def describe(family: str) -> str:
    """One JSON line: the family's placeholder, default image side and whether its processor needs torchvision."""
    spec = FAMILY_SPECS[family]
    return json.dumps(dict(family=family, placeholder=spec.placeholder, image_size=spec.side,
                           needs_torchvision=spec.needs_torchvision))
