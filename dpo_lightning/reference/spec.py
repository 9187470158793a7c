"""Where reference log-probs come from.

    copy     a frozen copy of the policy's initial weights (default when no other is named): loaded again
             from the same files (read-only mapped pages), or a deep copy of the policy where it cannot be
    model    a frozen, separately loaded model (``reference.name_or_path``)
    none     no reference (reference-free losses: ORPO, SimPO, CPO, ...): nothing is loaded or run
    adapter  the policy itself with its LoRA adapters disabled: no second copy of the weights
    cached   log-probs precomputed once and read from the batch (``precompute: true``)
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch

from dpo_lightning.models.hf import ModelSpec, freeze, load_causal_lm


@dataclass
class ReferenceSpec:
    """The ``reference`` config group binds to this.

    Attributes:
        name_or_path: a different reference model; None = the policy's initial weights.
        dtype: load the reference in this dtype (e.g. bf16 for a cheaper reference); None = policy's dtype.
        mode: auto | copy | model | adapter | none. ``auto`` picks none for reference-free losses, adapter
            for a LoRA policy, model when ``name_or_path`` is set, else copy.
        precompute: compute reference log-probs once before training and read them from a disk cache.
        quantization: bitsandbytes settings for the reference alone (see ``models/quantization.py``).
        sync: TR-DPO, ``{"alpha": 0.6, "every_n_steps": 512}``: move the reference towards the policy
            (``reference_sync.py``); None or ``every_n_steps: 0`` = a frozen reference.
    """

    name_or_path: str | None = None
    dtype: str | None = None
    mode: str = "auto"
    precompute: bool = False
    quantization: dict[str, Any] | None = None
    sync: dict[str, Any] | None = None

    def resolve_mode(self, requires_reference: bool, policy_is_peft: bool) -> str:
        if not requires_reference:
            return "none"
        if self.mode != "auto":
            if self.mode not in ("copy", "model", "adapter", "none"):
                raise ValueError(f"reference.mode={self.mode!r}: use auto, copy, model, adapter or none")
            if self.mode == "none":
                raise ValueError("reference.mode=none, but the chosen loss needs a reference model; "
                                 "pick a reference-free loss (orpo, simpo, cpo) or reference.mode=auto")
            if self.mode == "adapter" and not policy_is_peft:
                raise ValueError("reference.mode=adapter needs a LoRA policy (peft=lora)")
            return self.mode
        if self.name_or_path:
            return "model"
        return "adapter" if policy_is_peft else "copy"


def build_reference(mode: str, spec: ReferenceSpec, policy_spec: ModelSpec, policy: torch.nn.Module):
    """The frozen reference module for ``mode`` (None for none/adapter: no separate weights)."""
    if mode == "copy":
        if spec.dtype is None and spec.quantization is None:
            if policy_spec.quantization is None and not hasattr(policy, "peft_config"):
                # the same weights, loaded again: ``from_pretrained`` maps the weight files read-only, so the
                # pages the frozen reference never reads (embedding rows of tokens the data never holds) stay
                # on disk instead of in a private copy (``copy.deepcopy`` touches every byte)
                return freeze(load_causal_lm(policy_spec))
            return freeze(copy.deepcopy(policy))
        mode, spec = "model", ReferenceSpec(name_or_path=policy_spec.name_or_path, dtype=spec.dtype,
                                            quantization=spec.quantization)
    if mode == "model":
        ref_spec = ModelSpec(**{**policy_spec.__dict__, "name_or_path": spec.name_or_path or policy_spec.name_or_path,
                                "dtype": spec.dtype or policy_spec.dtype, "quantization": spec.quantization})
        return freeze(load_causal_lm(ref_spec))
    return None


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run a PEFT model as its base model (the reference) inside the block."""
    with model.disable_adapter():
        yield


@contextlib.contextmanager
def adapter_active(model: torch.nn.Module, name: str):
    """Run a PEFT model with adapter ``name`` instead of its active one inside the block, without touching which
    parameters train (peft's ``set_adapter`` would flip ``requires_grad``)."""
    layers = [m for m in model.modules() if hasattr(m, "_active_adapter") and hasattr(m, "active_adapters")]
    saved = [m.__dict__.get("_active_adapter") for m in layers]
    try:
        for m in layers:
            m._active_adapter = [name]
        yield
    finally:
        for m, old in zip(layers, saved):
            if old is None:
                del m._active_adapter
            else:
                m._active_adapter = old


@contextlib.contextmanager
def reference_model(module):
    """The model that computes ``module``'s reference, inside the block: the frozen reference module, or the
    policy with its adapters disabled (or switched to the TR-DPO ``reference`` adapter); None without one."""
    mode = getattr(module, "reference_mode", "none")
    if mode == "adapter":
        name = getattr(module, "reference_adapter", None)
        with adapter_active(module.policy, name) if name else adapters_disabled(module.policy):
            yield module.policy
    elif getattr(module, "reference", None) is not None:
        module.reference.eval()
        yield module.reference
    else:
        yield None
