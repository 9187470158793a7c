"""The inputs a vision-language model's forward takes for any batch layout (``models/vision_plan.py`` says which).

A collated batch with images carries ``vision``: the image processor's tensors (``pixel_values``,
``image_grid_thw``, ``image_sizes``, ``pixel_attention_mask``, ...) in the order the image tokens appear when the
layout's rows are read row-major: each pair's images twice in the plain layout (TRL's), once in the
prefix-sharing layouts. Everything per token is rebuilt here from the ids, for every layout:

    token types   ``image``: 1 on the image token (Gemma 3's ``token_type_ids``, Qwen-VL's ``mm_token_type_ids``);
                  ``suffix``: 1 on completion tokens (PaliGemma's ``token_type_ids``)
    positions     tree layouts of an ``mrope`` model: the model's own ``get_rope_index`` over the row, then each
                  segment moved to start at 0 (its positions are a translation of a fresh sequence's) and each
                  completion placed right after its prompt (completions are text: one position per token,
                  equal on the three axes), which is what the plain row of that sequence gets
    blocks        tree layouts: which tokens attend both ways (``block_ids``, -1 none): each run of image tokens
                  (``image_runs``) or the prompt (``prefix``); ``attention.tree_attention_mask`` adds them
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from dpo_lightning.models.vision_plan import VisionPlan


def has_images(batch: dict[str, Any]) -> bool:
    return bool(batch.get("vision"))


def token_types(rule: str, batch: dict[str, Any], image_token_id: int | None) -> torch.Tensor:
    ids = batch["input_ids"]
    if rule == "suffix":
        return batch["completion_mask"].long()
    if image_token_id is None:
        return torch.zeros_like(ids)
    return (ids == image_token_id).long()


def block_ids(rule: str | None, batch: dict[str, Any], image_token_id: int | None) -> torch.Tensor | None:
    """[N, L] block of each token (-1: none) for the tree mask, or None when the model has no such rule."""
    if rule is None:
        return None
    real = batch["segment_ids"] >= 0
    if rule == "prefix":  # the prompt of each segment (the mask's segment test keeps segments apart)
        return torch.where(real & ~batch["completion_mask"].bool(), 0, -1)
    is_image = batch["input_ids"] == image_token_id
    start = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, start.long().cumsum(1) - 1, -1)


def _rope_index(backbone: torch.nn.Module, **kwargs) -> torch.Tensor:
    fn: Any = backbone.get_rope_index
    names = set(inspect.signature(fn).parameters)
    return fn(**{k: v for k, v in kwargs.items() if k in names or "kwargs" in names})[0]


def mrope_positions(backbone: torch.nn.Module, batch: dict[str, Any], plan: VisionPlan) -> torch.Tensor:
    """[3, N, L] multimodal rotary positions of a tree / packed batch (see the module docstring)."""
    ids, seg = batch["input_ids"], batch["segment_ids"]
    real = seg >= 0
    vision = batch.get("vision") or {}
    pos = _rope_index(backbone, input_ids=ids, mm_token_type_ids=token_types("image", batch, plan.image_token_id),
                      image_grid_thw=vision.get("image_grid_thw"), video_grid_thw=None,
                      attention_mask=real.long()).clone()
    comp = batch["completion_mask"].bool()
    branch = batch.get("branch_ids")
    for r in range(ids.size(0)):
        for s in seg[r][real[r]].unique().tolist():
            cols = (seg[r] == s).nonzero(as_tuple=True)[0]
            pos[:, r, cols] -= pos[0, r, cols[0]].clone()  # the segment starts at 0, as a fresh sequence
            in_comp = cols[comp[r, cols]]
            if not len(in_comp):
                continue
            first = int(in_comp[0])  # branch 1's first token: right after the prompt
            base = int(pos[0, r, first])
            br = branch[r, in_comp] if branch is not None else torch.ones_like(in_comp)
            for b in br.unique().tolist():
                cc = in_comp[br == b]
                pos[:, r, cc] = base + torch.arange(len(cc), device=pos.device)
    return pos


def vision_kwargs(backbone: torch.nn.Module | None, batch: dict[str, Any], plan: VisionPlan | None,
                  tree: bool) -> dict[str, Any]:
    """The forward's image and per-token inputs for ``batch`` ({} for a batch without images)."""
    if plan is None or not has_images(batch):
        return {}
    kwargs: dict[str, Any] = dict(batch["vision"])
    for name, rule in plan.token_types.items():
        kwargs[name] = token_types(rule, batch, plan.image_token_id)
    if tree and plan.positions == "mrope" and backbone is not None:
        kwargs["position_ids"] = mrope_positions(backbone, batch, plan)
    return kwargs
