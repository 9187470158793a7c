"""The vision part of a batch (``collate.py``): the images' model inputs, in the order the image tokens appear in
the layout's rows, and the per-token type ids some families take.

    extra = vision_inputs(processor, layout, [row["images"] for row in rows], completions_per_prompt)

Order (the image tokens read row-major, row after row): ``plain`` repeats each prompt's images once per
completion, rows 0..B-1 then B..2B-1 (TRL's order); ``prefix_shared`` and ``packed`` give each prompt's images
once (its prompt is computed once); ``packed_unshared`` gives one copy per sequence, each prompt's sequences side
by side (prompt 0 + completion 0, prompt 0 + completion 1, prompt 1 + ...).

The images go through the processor's own image path in one call (the same resizing, splitting and padding as
when the prompt was tokenized): Idefics3 / SmolVLM get them as one sample (``pixel_values`` [1, images, C, H, W]
with ``pixel_attention_mask`` [1, images, H, W], no padding images), the others as a flat list
(``pixel_values`` [images, ...] or Qwen2-VL's flat patches with ``image_grid_thw``, LLaVA-NeXT's
[images, patches, C, H, W] with ``image_sizes``). Keys no model forward takes (``images.NOT_FORWARD``) are left
out.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from dpo_lightning.data import images as imgs
from dpo_lightning.data.layouts import PACKED_UNSHARED, SHARED_LAYOUTS


def image_groups(layout: str, per_prompt: list[list[Any]], k: int) -> list[list[Any]]:
    """The images of a batch per prompt copy, the copies in the order their tokens appear in ``layout``'s rows
    (module docstring); ``per_prompt[i]``: prompt i's images, ``k``: completions per prompt."""
    if layout in SHARED_LAYOUTS:
        return [list(group) for group in per_prompt]
    if layout == PACKED_UNSHARED:
        return [list(group) for group in per_prompt for _ in range(k)]
    return [list(group) for _ in range(k) for group in per_prompt]


def image_order(layout: str, per_prompt: list[list[Any]], k: int) -> list[Any]:
    """``image_groups`` flattened: every image in token order."""
    return [b for group in image_groups(layout, per_prompt, k) for b in group]


def _one_sample(processor: Any) -> bool:
    """Idefics3 / SmolVLM take a batch's images nested per sample: all of them as one sample."""
    name = type(processor.image_processor).__name__
    return "Idefics" in name or "SmolVLM" in name


def pixel_inputs(processor: Any, images: list) -> dict[str, torch.Tensor]:
    """The model-forward image tensors of ``images`` (encoded bytes in token order, or one list per prompt copy)
    from one processor call. Per prompt copy matters where a family treats a prompt with several images apart
    from one with a single image (LLaVA-OneVision: ``batch_num_images``, anyres patches for single images only)."""
    groups = [list(g) for g in images if len(g)] if images and isinstance(images[0], (list, tuple)) else \
        [[b] for b in images]
    decoded: dict[bytes, Any] = {}
    pil: list[list[Any]] = []
    for group in groups:
        pil.append([])
        for b in group:
            if b not in decoded:
                decoded[b] = imgs.decode(b)
            pil[-1].append(decoded[b])
    batch: Any = [[im for group in pil for im in group]] if _one_sample(processor) else pil
    try:
        out = processor(images=batch, return_tensors="pt")
    except (TypeError, ValueError):  # a processor that wants text too (InternVL): its image processor alone
        out = processor.image_processor(batch, return_tensors="pt")
    return {k: v for k, v in out.items()
            if isinstance(v, torch.Tensor) and k not in imgs.NOT_FORWARD and k not in TEXT_KEYS}


TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def _probe(processor: Any) -> dict[str, Any]:
    """Which per-token type ids the processor returns for a prompt with an image, and the ids they mark."""
    from PIL import Image

    img = Image.new("RGB", (32, 32), (127, 127, 127))
    text = "" if imgs.adds_image_tokens_itself(processor) else imgs.placeholder(processor) or ""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    try:
        out = processor(images=[imgs.decode(buf.getvalue())], text=[text], add_special_tokens=False)
    except Exception:  # noqa: BLE001 - a processor that cannot do this probe returns no type ids
        return {}
    found: dict[str, Any] = {}
    ids = list(out["input_ids"][0])
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in out:
            types = list(out[key][0])
            found[key] = ("completion" if key == "token_type_ids" and imgs.adds_image_tokens_itself(processor)
                          else {t: v for t, v in zip(ids, types) if v})
    return found


class VisionBatcher:
    """Adds the vision keys to a collated batch (``collate.py``); built once per collator, picklable."""

    def __init__(self, processor: Any):
        self.processor = processor
        self._types: dict[str, Any] | None = None

    def type_rules(self) -> dict[str, Any]:
        if self._types is None:
            self._types = _probe(self.processor)
        return self._types

    def add(self, batch: dict[str, Any], layout: str, per_prompt: list[list[bytes]], k: int) -> dict[str, Any]:
        """``batch`` with ``vision`` (and the type ids) when any prompt has an image; unchanged otherwise."""
        if not any(per_prompt):
            return batch
        batch["vision"] = pixel_inputs(self.processor, image_groups(layout, per_prompt, k))
        ids = batch["input_ids"]
        real = batch["attention_mask"].bool() if batch["attention_mask"].dim() == 2 else ids.ne(-1)
        for key, rule in self.type_rules().items():
            if rule == "completion":  # PaliGemma: 0 on the prefix (prompt with its image), 1 on the completion
                types = batch["completion_mask"].long()
            else:  # 1 (or the processor's value) on the tokens it marks, e.g. the image token
                types = torch.zeros_like(ids)
                for token, value in rule.items():
                    types[ids.eq(int(token))] = int(value)
            batch[key] = types * real.long()
        return batch
