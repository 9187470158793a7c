"""Where reference log-probs come from: the ``reference`` config group (``ReferenceSpec``) and its modes.

    copy     a frozen copy of the policy's initial weights (default when no other is named): loaded again
             from the same files (read-only mapped pages), or a deep copy of the policy where it cannot be
    model    a frozen, separately loaded model (``reference.name_or_path``)
    none     no reference (reference-free losses: ORPO, SimPO, CPO, ...): nothing is loaded or run
    adapter  the policy itself with its LoRA adapters disabled: no second copy of the weights
    cached   log-probs precomputed once and read from the batch (``precompute: true``)

``check_precompute`` holds the one refusal of ``reference.precompute`` for KTO's KL rows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from dpo_lightning.models.hf import ModelSpec, freeze, load_causal_lm
from dpo_lightning.models.peft import is_peft_model

AUTO = "auto"  # ReferenceSpec.mode: pick the mode from the loss, the policy and name_or_path


class Mode(str, Enum):
    """A resolved reference mode (the module docstring says what each is). A ``str``: it compares equal to,
    formats and serializes as its value (``reference.json``'s ``mode``)."""

    COPY = "copy"
    MODEL = "model"
    ADAPTER = "adapter"
    CACHED = "cached"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


class PrecomputeError(ValueError):
    """Reference log-probs cannot be precomputed for this setup."""


def precompute_refusal(loss_name: str | None = None) -> str:
    """Why ``reference.precompute`` cannot serve KTO's KL rows (the one wording of it)."""
    of = f" (loss {loss_name!r})" if loss_name else ""
    return (f"reference.precompute=true cannot serve KTO's KL rows{of}: they pair prompt i with completion i-1 of "
            "the same batch, so their reference log-probs depend on the batching; set reference.precompute=false")


def check_precompute(kl_rows: bool, loss_name: str | None = None) -> None:
    """Raise ``PrecomputeError`` when precomputed reference log-probs would have to serve KL rows."""
    if kl_rows:
        raise PrecomputeError(precompute_refusal(loss_name))


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
            (``reference/sync.py``); None or ``every_n_steps: 0`` = a frozen reference.
    """

    name_or_path: str | None = None
    dtype: str | None = None
    mode: str = AUTO
    precompute: bool = False
    quantization: dict[str, Any] | None = None
    sync: dict[str, Any] | None = None

    def resolve_mode(self, requires_reference: bool, policy_is_peft: bool) -> Mode:
        """The live mode for a loss and a policy (``precompute`` aside: ``Reference.build`` applies it)."""
        if not requires_reference:
            return Mode.NONE
        if self.mode != AUTO:
            if self.mode not in (Mode.COPY, Mode.MODEL, Mode.ADAPTER, Mode.NONE):
                raise ValueError(f"reference.mode={self.mode!r}: use auto, copy, model, adapter or none")
            if self.mode == Mode.NONE:
                raise ValueError("reference.mode=none, but the chosen loss needs a reference model; "
                                 "pick a reference-free loss (orpo, simpo, cpo) or reference.mode=auto")
            if self.mode == Mode.ADAPTER and not policy_is_peft:
                raise ValueError("reference.mode=adapter needs a LoRA policy (peft=lora)")
            return Mode(self.mode)
        if self.name_or_path:
            return Mode.MODEL
        return Mode.ADAPTER if policy_is_peft else Mode.COPY

    @property
    def separate(self) -> bool:
        """Whether the reference needs weights of its own (another model, dtype or quantization) rather than
        the policy's initial ones."""
        return bool(self.name_or_path or self.dtype or self.quantization)


def build_reference(mode: Mode, spec: ReferenceSpec, policy_spec: ModelSpec, policy: torch.nn.Module):
    """The frozen reference module for ``mode`` (None for none/adapter/cached: no separate weights)."""
    if mode == Mode.COPY:
        if spec.dtype is None and spec.quantization is None:
            if policy_spec.quantization is None and not is_peft_model(policy):
                # the same weights, loaded again: ``from_pretrained`` maps the weight files read-only, so the
                # pages the frozen reference never reads (embedding rows of tokens the data never holds) stay
                # on disk instead of in a private copy (``copy.deepcopy`` touches every byte)
                return freeze(load_causal_lm(policy_spec))
            return freeze(copy.deepcopy(policy))
        mode, spec = Mode.MODEL, ReferenceSpec(name_or_path=policy_spec.name_or_path, dtype=spec.dtype,
                                               quantization=spec.quantization)
    if mode == Mode.MODEL:
        ref_spec = ModelSpec(**{**policy_spec.__dict__, "name_or_path": spec.name_or_path or policy_spec.name_or_path,
                                "dtype": spec.dtype or policy_spec.dtype, "quantization": spec.quantization})
        return freeze(load_causal_lm(ref_spec))
    return None
