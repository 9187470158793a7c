"""What the package must know about image-text-to-text models (VLMs): which models are ones, their processor's
tokenizer, their language model, and which of their parameters train.

A VLM is a language model (decoder + LM head) fed by a vision tower through a projector. Preference tuning
trains the language model only (``freeze_vision_tower``, ``ModelSpec.freeze_vision``), LoRA's default targets
(``all-linear``) become the language model's linear layers (``lora_targets``), and bitsandbytes leaves the vision
tower and the projector in full precision (``quantization_skip_modules``). Every helper here answers "not a VLM" or
"unknown structure" (and the text path continues) rather than fail on a model it does not recognize.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

log = logging.getLogger("dpo_lightning")


def _config(obj: Any) -> Any:
    """The config of a model (PEFT-wrapped or not), or ``obj`` itself when it is a config."""
    return getattr(obj, "config", obj)


def is_vision_model(config_or_model: Any) -> bool:
    """True for an image-text-to-text model or its config: it has a ``vision_config``, or its model type is one of
    transformers' image-text-to-text types and not a text-only causal LM type (``gemma3_text`` is text-only).
    False for anything else, also for a structure it does not understand."""
    try:
        config = _config(config_or_model)
        if getattr(config, "vision_config", None) is not None:
            return True
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        )

        model_type = getattr(config, "model_type", None)
        return (isinstance(model_type, str) and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
                and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    except Exception:  # an unknown structure: the text path continues
        return False


def is_processor(obj: Any) -> bool:
    """True for a multimodal processor (``transformers.ProcessorMixin``: a tokenizer plus an image processor)."""
    try:
        from transformers import ProcessorMixin
    except ImportError:  # pragma: no cover - every supported transformers has it
        return False
    return isinstance(obj, ProcessorMixin)


def text_tokenizer(processing_class: Any) -> Any:
    """The tokenizer inside a processor (``processor.tokenizer``); a tokenizer itself."""
    return processing_class.tokenizer if is_processor(processing_class) else processing_class


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The base model of a PEFT-wrapped model (the same object otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def language_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The VLM's decoder (``model.model.language_model``, ``model.language_model``, or ``get_decoder()``: Idefics3
    and SmolVLM call it ``text_model``); None when none is found."""
    base = _unwrap(model)
    inner = getattr(base, "model", None)
    for candidate in (getattr(inner, "language_model", None), getattr(base, "language_model", None)):
        if isinstance(candidate, torch.nn.Module):
            return candidate
    try:
        decoder = base.get_decoder()  # type: ignore[operator]  # a PreTrainedModel's method
    except Exception:
        return None
    if isinstance(decoder, torch.nn.Module) and decoder is not base and decoder is not inner:
        return decoder
    return None


def _prefix(root: torch.nn.Module, module: torch.nn.Module) -> str | None:
    return next((name for name, m in root.named_modules() if m is module), None)


def language_model_names(model: torch.nn.Module) -> tuple[str, str | None] | None:
    """The dotted names (in ``model``, unwrapped from PEFT) of the language model and of the LM head; None when
    the language model cannot be found."""
    base = _unwrap(model)
    lm = language_model(base)
    prefix = _prefix(base, lm) if lm is not None else None
    if not prefix:
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None  # type: ignore[operator]  # a PreTrainedModel method
    head_name = _prefix(base, head) if isinstance(head, torch.nn.Module) else None
    return prefix, head_name


def _outside(name: str, keep: tuple[str, ...]) -> bool:
    return not any(name == k or name.startswith(k + ".") for k in keep)


def freeze_vision_tower(model: torch.nn.Module) -> list[str]:
    """Freeze every parameter outside the language model and the LM head (the vision tower and the projector);
    returns the frozen parameters' names. For a model whose language model cannot be found it warns and freezes
    nothing.

    Why by default (``ModelSpec.freeze_vision: true``): preference tuning of VLMs trains the language model and
    keeps the vision encoder as pretrained — RLAIF-V and LLaVA-RLHF, LLaVA's own instruction-tuning recipe (the
    encoder frozen), TRL's VLM DPO examples (LoRA on the language model) — and a frozen tower needs no gradients and
    no optimizer state (two fp32 copies of its weights with Adam).
    """
    names = language_model_names(model)
    if names is None:
        log.warning("freeze_vision: cannot find the language model of %s (no model.language_model, "
                    "language_model or get_decoder()); no parameter frozen", type(_unwrap(model)).__name__)
        return []
    keep = tuple(n for n in names if n)
    frozen = []
    for name, param in _unwrap(model).named_parameters():
        if _outside(name, keep) and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    log.info("freeze_vision: %d parameter tensors of the vision tower and projector frozen (%d values)",
             len(frozen), sum(p.numel() for n, p in _unwrap(model).named_parameters() if n in set(frozen)))
    return frozen


def lora_targets(model: torch.nn.Module) -> str | None:
    """A PEFT ``target_modules`` regex for every linear layer of the VLM's language model (``all-linear``
    restricted to it: not the vision tower, the projector or the LM head); None when it is not a VLM or its
    language model cannot be found."""
    if not is_vision_model(model):
        return None
    names = language_model_names(model)
    if names is None:
        return None
    prefix = names[0]
    lm = _unwrap(model).get_submodule(prefix)
    leaves = sorted({name.rsplit(".", 1)[-1] for name, m in lm.named_modules()
                     if isinstance(m, torch.nn.Linear) and name})
    if not leaves:
        return None
    return rf"{re.escape(prefix)}\.(?:.*\.)?({'|'.join(map(re.escape, leaves))})"


def quantization_skip_modules(config: Any) -> list[str] | None:
    """bitsandbytes' ``llm_int8_skip_modules`` for a VLM config: the vision tower, the projector and the LM head
    stay in full precision (the children outside the language model, found on a model built on the meta device);
    None when it is not a VLM or its structure is unknown."""
    if not is_vision_model(config):
        return None
    try:
        from transformers import AutoModelForImageTextToText

        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    except Exception as err:
        log.warning("quantization: cannot build %s on the meta device (%s); bitsandbytes' default skips apply",
                    type(config).__name__, err)
        return None
    names = language_model_names(model)
    if names is None:
        return None
    prefix, head = names
    skip = [name for name, _ in _top_outside(model, prefix)] + ([head] if head else [])
    return list(dict.fromkeys(skip))


def _top_outside(model: torch.nn.Module, prefix: str):
    """The largest submodules holding parameters that lie outside ``prefix`` (the language model) and are not on
    the path to it: ``model.vision_tower``, ``model.multi_modal_projector``, ``lm_head``, ..."""
    parts = prefix.split(".")
    ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
    out = []
    for name, module in model.named_modules():
        if not name or name == prefix or name in ancestors:
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if (parent == "" or parent in ancestors) and any(True for _ in module.parameters()):
            out.append((name, module))
    return out
