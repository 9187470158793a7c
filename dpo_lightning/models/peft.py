"""Parameter-efficient fine-tuning: wrap the loaded policy in LoRA adapters (the ``peft`` config group).

    peft=lora                       LoRA on every linear layer of the decoder (``target_modules: all-linear``;
                                    for a vision-language model, of its language model only)
    peft.adapter_path=<folder>      start from a saved adapter (dpo-train) / evaluate it (dpo-eval)
    peft=lora quantization=bnb_4bit QLoRA: 4-bit frozen base, LoRA adapters, k-bit training preparation

Only the adapter weights train. The reference is then the policy with its adapters disabled
(``reference.mode=auto`` resolves to ``adapter``): no second copy of the base weights is loaded.

``is_peft_model`` is the one test of "is this model wrapped in PEFT adapters"; ``adapters_disabled`` and
``adapter_active`` run such a model as its base model or with another of its adapters.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from dpo_lightning.models.quantization import is_quantized, keep_off_cpu_packed_path
from dpo_lightning.models.vision import is_vision_model, lora_targets

log = logging.getLogger("dpo_lightning")

METHODS = ("lora",)
# Our config keys -> peft.LoraConfig arguments.
_LORA_KEYS = {
    "r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
    "bias": "bias", "modules_to_save": "modules_to_save", "use_rslora": "use_rslora", "use_dora": "use_dora",
    "init_lora_weights": "init_lora_weights", "layers_to_transform": "layers_to_transform",
    "exclude_modules": "exclude_modules",
}
_OWN_KEYS = {"method", "adapter_path"}


def is_peft_model(model: torch.nn.Module | None) -> bool:
    """True for a model wrapped in PEFT adapters (``peft.PeftModel``): its adapters can be disabled, merged
    and saved alone."""
    return model is not None and hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def peft_base(model: torch.nn.Module) -> torch.nn.Module:
    """The wrapped base model of a PEFT model (where the LoRA layers live); any other model itself."""
    return model.get_base_model() if is_peft_model(model) else model  # type: ignore[operator]  # PEFT's method


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run a PEFT model as its base model inside the block."""
    with model.disable_adapter():  # type: ignore[operator]  # PEFT's method
        yield


@contextlib.contextmanager
def adapter_active(model: torch.nn.Module, name: str):
    """Run a PEFT model with adapter ``name`` instead of its active one inside the block, without touching which
    parameters train (peft's ``set_adapter`` would flip ``requires_grad``)."""
    layers = [m for m in model.modules() if hasattr(m, "_active_adapter") and hasattr(m, "active_adapters")]
    saved = [m.__dict__.get("_active_adapter") for m in layers]
    try:
        for m in layers:
            m._active_adapter = [name]  # type: ignore[assignment]  # a PEFT layer's attribute
        yield
    finally:
        for m, old in zip(layers, saved):
            if old is None:
                del m._active_adapter
            else:
                m._active_adapter = old


def lora_config(settings: dict[str, Any], model: torch.nn.Module | None = None):
    """A ``peft.LoraConfig`` for a causal LM from our ``peft`` mapping. For an image-text-to-text ``model`` the
    default targets (``all-linear``) become the linear layers of its language model only (``vision.lora_targets``:
    not the vision tower, the projector or the LM head); targets named explicitly are kept as given."""
    from peft import LoraConfig

    settings = dict(settings)
    unknown = sorted(set(settings) - set(_LORA_KEYS) - _OWN_KEYS)
    if unknown:
        raise ValueError(f"peft: unknown keys {unknown}; known: {sorted(set(_LORA_KEYS) | _OWN_KEYS)}")
    kwargs = {_LORA_KEYS[k]: v for k, v in settings.items() if k in _LORA_KEYS and v is not None}
    targets = kwargs.get("target_modules")
    if isinstance(targets, (list, tuple)):
        kwargs["target_modules"] = list(targets)
    kwargs.setdefault("target_modules", "all-linear")
    if kwargs["target_modules"] == "all-linear" and model is not None and is_vision_model(model):
        targets = lora_targets(model)
        if targets is not None:
            kwargs["target_modules"] = targets
            log.info("LoRA on a vision-language model: all-linear restricted to the language model (%s)", targets)
    if int(kwargs.get("r", 8)) < 1:
        raise ValueError(f"peft.r={kwargs['r']}: the LoRA rank must be at least 1")
    return LoraConfig(task_type="CAUSAL_LM", **kwargs)


def apply_peft(model: torch.nn.Module, settings: dict[str, Any] | None) -> torch.nn.Module:
    """``model`` wrapped in adapters as ``settings`` asks (None or ``method: none``: unchanged).

    A bitsandbytes-quantized model is first prepared for k-bit training (``prepare_model_for_kbit_training``:
    non-quantized weights such as norms and embeddings in fp32, input gradients enabled), as QLoRA does.
    Activation checkpointing is the module's own ``gradient_checkpointing`` option (or FSDP's).
    """
    if not settings or settings.get("method", "lora") in (None, "none"):
        return model
    method = settings.get("method", "lora")
    if method not in METHODS:
        raise ValueError(f"peft.method={method!r}: supported methods are {METHODS} (or peft=none)")
    from peft import get_peft_model, prepare_model_for_kbit_training

    if is_quantized(model):
        keep_off_cpu_packed_path(model)  # also for a model not loaded by load_causal_lm (see quantization.py)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if settings.get("adapter_path"):  # a saved adapter (its own r, alpha, targets), trainable
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(settings["adapter_path"]), is_trainable=True)
        log.info("LoRA: loaded the adapter in %s (its own r / alpha / target modules)", settings["adapter_path"])
    else:
        model = get_peft_model(model, lora_config(settings, model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA: %d trainable parameters of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model
