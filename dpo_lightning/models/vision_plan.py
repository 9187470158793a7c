"""What the log-prob engine must know about an image-text-to-text model to run a pair's image once.

In the prefix-sharing layouts (``prefix_shared``, ``packed``) a pair's prompt, with its image tokens, is in the
row once, followed by the chosen and the rejected completion: the vision tower, the projector and the prompt's
positions run once per pair. That is exact when the engine can rebuild what the model's own forward would
build from the plain rows (TRL's layout, each image given twice):

    positions     ``1d``: the layout's ``position_ids`` (LLaVA, LLaVA-NeXT / OneVision, Idefics3 / SmolVLM,
                  Mistral 3, Gemma 3, PaliGemma, ...); ``mrope``: the multimodal rotary positions of the Qwen-VL
                  families (3-D ``position_ids`` from the model's own ``get_rope_index``; ``engine/vision.py``)
    blocks        which prompt tokens attend to each other both ways, a rule added to the tree mask:
                  ``image_runs`` (each run of image tokens, Gemma 3), ``prefix`` (the whole prompt, PaliGemma's
                  prefix-LM), None (causal only)
    token_types   per-token inputs the forward takes, built from the ids: name -> ``image`` (1 on image tokens:
                  Gemma 3's ``token_type_ids``, Qwen-VL's ``mm_token_type_ids``) or ``suffix`` (1 on completion
                  tokens: PaliGemma's ``token_type_ids``)

A model whose forward takes per-token inputs this table does not know keeps batches with images in the plain
layout ("steps aside"); the probe (``engine/probe.py``, on the first batch with images) checks the rest against
the model's own forward and narrows ``VisionPlan.layouts`` when they differ.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from dpo_lightning.data.layouts import PLAIN, SHARED_LAYOUTS, TREE_LAYOUTS

# model_type (the composite config's) -> (blocks rule, token-type rules). Read from each family's modeling code
# (transformers 5.25): Gemma 3 builds ``block_sequence_ids`` from runs of token type 1 (its image tokens),
# PaliGemma from token type 0 (the prefix: image + prompt).
FAMILY_RULES: dict[str, tuple[str | None, dict[str, str]]] = {
    "gemma3": ("image_runs", {"token_type_ids": "image"}),
    "paligemma": ("prefix", {"token_type_ids": "suffix"}),
}
MROPE_TYPES = {"mm_token_type_ids": "image"}  # Qwen2-VL / Qwen2.5-VL / Qwen3-VL in transformers 5


@dataclass
class VisionPlan:
    """How batches with images run for one model (see the module docstring)."""

    image_token_id: int | None
    positions: str = "1d"
    blocks: str | None = None
    token_types: dict[str, str] = field(default_factory=dict)
    layouts: set[str] = field(default_factory=lambda: {PLAIN})
    note: str = ""  # why the prefix-sharing layouts are off for images, if they are
    verified: bool = False  # the probe compared a batch with images (or was switched off)


def image_token_id(config: Any) -> int | None:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def multimodal_token_ids(config: Any) -> set[int]:
    """The ids of a VLM's image / video / vision marker tokens (``image_token_id``, ``boi_token_index``, ...) from its
    config and its text config: tokens that mean "pixels go here", which text alone must not hold."""
    found: set[int] = set()
    configs = [config, getattr(config, "text_config", None)]
    for cfg in configs:
        for name, value in (vars(cfg).items() if cfg is not None else ()):
            if isinstance(value, int) and value >= 0 and name.endswith(("_token_id", "_token_index")) and any(
                    w in name for w in ("image", "video", "vision", "boi", "eoi")):
                found.add(value)
    return found


def _forward_params(module: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(type(module).forward).parameters)
    except (TypeError, ValueError):
        return set()


def vision_plan(base: torch.nn.Module, backbone: torch.nn.Module | None, text_layouts: set[str]) -> VisionPlan | None:
    """The plan for a model with a vision tower (None for a text model). ``text_layouts``: the layouts its
    language model takes exactly for text (``quirks.attention_plan``); images add the rules above."""
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "vision_config", None) is None:
        return None
    token_id = image_token_id(cfg)
    plan = VisionPlan(image_token_id=token_id)
    model_type = getattr(cfg, "model_type", "")
    params = _forward_params(backbone) if backbone is not None else set()
    blocks, types = FAMILY_RULES.get(model_type, (None, {}))
    if "mm_token_type_ids" in params:
        types = {**types, **MROPE_TYPES}
    unknown = sorted(p for p in params if p.endswith("token_type_ids") and p not in types)
    if backbone is not None and callable(getattr(backbone, "get_rope_index", None)):
        plan.positions = "mrope"
    plan.blocks, plan.token_types = blocks, dict(types)
    shared = set(SHARED_LAYOUTS) & text_layouts
    trees = set(TREE_LAYOUTS) & text_layouts  # packed_unshared too: a prompt and its images once per sequence
    if token_id is None:
        plan.note = f"{model_type}: no image token id in its config"
    elif backbone is None:
        plan.note = f"{type(base).__name__}: no backbone to run on a shared prompt"
    elif unknown:
        plan.note = f"{type(backbone).__name__} takes {', '.join(unknown)}, whose meaning is not known here"
    elif not shared:
        plan.note = f"{model_type}: its language model takes no tree mask"
    else:
        plan.layouts = {PLAIN} | trees
    return plan
