"""Model inputs for every batch layout of ``data/collate.py``: 4D tree masks (sliding windows included) and the
conversion of any layout back to the plain one when a model cannot take a tree mask exactly.

A tree/packed batch carries ``segment_ids`` / ``branch_ids`` / ``position_ids``. Query q sees key k iff k <= q,
both are in the same segment, k is in the shared prompt (branch 0) or in q's branch, and, on a sliding-window
layer of window W, ``pos[q] - pos[k] < W`` (transformers' ``sliding_window_overlay`` on the plain layout's
indices, which are the positions each sequence has there). Which window each layer gets comes from
``models/quirks.py`` (``EnginePlan.windows``): one mask for all layers, or a dict keyed by layer type.
"""

from __future__ import annotations

from typing import Any

import torch

from dpo_lightning.engine.vision import block_ids as vision_blocks
from dpo_lightning.engine.vision import has_images, vision_kwargs
from dpo_lightning.models.quirks import EnginePlan, backbone_of, base_model


def attn_implementation(model: torch.nn.Module) -> str:
    """The attention backend a model runs (``sdpa``, ``eager``, ``flash_attention_2``, ...)."""
    return str(getattr(base_model(model).config, "_attn_implementation", None) or "eager")


def tree_attention_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor | None = None, *,
                        additive_dtype: torch.dtype | None = None, position_ids: torch.Tensor | None = None,
                        window: int | None = None, block_ids: torch.Tensor | None = None) -> torch.Tensor:
    """4D mask [N, 1, L, L] for packed / prefix-shared rows (see the module docstring). Padding (segment -1)
    only sees padding, so no query row is empty (no NaN). Boolean (True = attend) for SDPA, or additive
    (0 / finfo.min) in ``additive_dtype`` for eager attention. ``block_ids`` [N, L] (-1: none): tokens of one
    block in one segment also see each other both ways (a VLM's image tokens or prefix; ``engine/vision.py``),
    inside the sliding window as the model's own mask does."""
    L = segment_ids.size(1)
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril_()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = same & causal
    if branch_ids is not None:
        mask &= (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    if block_ids is not None:
        mask |= same & (block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, :, None] >= 0)
    if window is not None:
        if position_ids is None:
            raise ValueError("a sliding-window tree mask needs position_ids")
        mask &= (position_ids[:, :, None] - position_ids[:, None, :]) < window
    mask = mask[:, None]
    if additive_dtype is not None:
        mask = torch.zeros(mask.shape, dtype=additive_dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(additive_dtype).min)
    return mask


def model_inputs(model: torch.nn.Module, batch: dict[str, Any], plan: EnginePlan | None = None) -> dict[str, Any]:
    """Keyword arguments of the backbone / model forward for any layout of ``collate.py``, images included
    (``engine/vision.py``)."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    seg = batch.get("segment_ids")
    vplan = plan.vision if plan is not None else None
    if has_images(batch) and vplan is not None:
        kwargs.update(vision_kwargs(backbone_of(base_model(model))[0], batch, vplan, tree=seg is not None))
    if seg is None:
        kwargs["attention_mask"] = batch.get("attention_mask")
        return kwargs
    branch = batch.get("branch_ids")
    impl = attn_implementation(model)
    shared = branch is not None  # only prefix-sharing layouts carry branch ids
    if impl.startswith("flash"):
        if shared:
            raise ValueError(f"layout with prefix sharing needs an attention backend that takes a 4D mask "
                             f"(sdpa or eager), not {impl!r}; use data.layout=packed_unshared or plain")
        kwargs["attention_mask"] = None  # flash varlen: sequence boundaries from the restarting position_ids
        return kwargs
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"layout {batch.get('layout', 'tree')!r} builds a 4D attention mask, which attention "
                         f"backend {impl!r} does not take; use attn_implementation=sdpa or data.layout=plain")
    dtype = None if impl == "sdpa" else next(model.parameters()).dtype
    windows = plan.windows if plan is not None and plan.windows else {"full_attention": None}
    blocks = vision_blocks(vplan.blocks, batch, vplan.image_token_id) if vplan is not None and has_images(batch) \
        else None
    masks = {kind: tree_attention_mask(seg, branch, additive_dtype=dtype, position_ids=batch.get("position_ids"),
                                       window=w, block_ids=blocks) for kind, w in windows.items()}
    if plan is not None and plan.dict_masks:
        kwargs["attention_mask"] = masks  # the backbone picks each layer's mask by its layer type
    else:
        (kwargs["attention_mask"],) = masks.values()  # one kind of layer (quirks.attention_plan checks)
    return kwargs
