"""What the log-prob engine must know about an architecture, read from the model, its config and its code.

The engine (``engine/logprobs.py``) goes around the model's own forward in two ways: it runs the LM head itself on the
completion positions only (chunked, reading the head's weight), and it feeds 4D tree / packed attention masks
with restarted ``position_ids``. Both are exact only if they reproduce what the model does. ``engine_plan``
returns an ``EnginePlan`` saying, for one model, what is provably the same:

    head      how the last hidden state becomes logits: ``softcap(scale * (h W^T + b))`` (``HeadRule``);
              None = unknown, the model's own head is used (``full logits``)
    layouts   which batch layouts the backbone takes exactly (``plain`` always; tree/packed layouts only when
              positions come from ``position_ids`` and every attention layer's mask is one we can build)
    windows   per attention layer type, the sliding window (None = full attention) of its tree mask, and
              whether the backbone takes a dict of masks keyed by layer type (transformers >= 5 models with
              ``config.layer_types``) or one mask for every layer
    aux       the MoE router load-balancing loss TRL 1.16 adds to the policy loss (its forward then runs in a
              layout of ``AUX_LAYOUTS``)

Everything architecture-specific lives in the tables below (no ``model_type`` checks elsewhere). What the
tables do not cover is decided from the model's code (``inspect``) and, at run time, by the probe
(``engine/probe.py``), which compares the fast path with the model's own forward before the first step.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from dpo_lightning.data.layouts import PACKED_UNSHARED, PLAIN, TREE_LAYOUTS
from dpo_lightning.models.peft import peft_base
from dpo_lightning.models.vision_plan import VisionPlan, vision_plan

# layouts whose real tokens are those of the plain rows: the MoE router loss averages over every real token, so
# with it a shared prompt (counted once in prefix_shared / packed) would change its value
AUX_LAYOUTS = frozenset({PLAIN, PACKED_UNSHARED})


@dataclass(frozen=True)
class HeadRule:
    """logits = softcap(scale * (h W^T + b)); softcap(z) = c * tanh(z / c) when ``softcap`` = c is set."""

    scale: float = 1.0
    softcap: float | None = None

    def describe(self) -> str:
        parts = ([f"scale {self.scale:g}"] if self.scale != 1.0 else []) + (
            [f"softcap {self.softcap:g}"] if self.softcap else [])
        return ", ".join(parts) or "identity"


def _softcap(attr: str) -> Callable[[Any], HeadRule]:
    return lambda c: HeadRule(softcap=getattr(c, attr, None) or None)


def _multiply(attr: str) -> Callable[[Any], HeadRule]:
    return lambda c: HeadRule(scale=float(getattr(c, attr)))


def _divide(attr: str) -> Callable[[Any], HeadRule]:
    return lambda c: HeadRule(scale=1.0 / float(getattr(c, attr)))


# model_type -> what its ForCausalLM.forward does to the logits after ``lm_head`` (transformers 5.24, read from
# each model's code). Every other model is checked against STANDARD_HEAD_LINES below.
HEAD_RULES: dict[str, Callable[[Any], HeadRule]] = {
    **dict.fromkeys(("gemma2", "gemma3", "gemma3_text", "gemma3n_text", "vaultgemma", "nanochat", "beam"),
                    _softcap("final_logit_softcapping")),
    "recurrent_gemma": _softcap("logits_soft_cap"),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text"),
                    _multiply("logit_scale")),
    **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid",
                     "granitemoeshared", "minicpm3"), _divide("logits_scaling")),
    "hyperclovax": _multiply("logits_scaling"),
    "falcon_h1": _multiply("lm_head_multiplier"),
    # image-text-to-text models whose own forward transforms the logits, whatever their text model does
    "paligemma": _softcap("final_logit_softcapping"),  # read from its text config (Gemma 2: 30; Gemma: none)
}
COMPOSITE_HEAD_RULES = {"paligemma"}

# The lines a plain ForCausalLM.forward has between the backbone's output and the loss: logits = lm_head(h).
STANDARD_HEAD_LINES = {
    "hidden_states = outputs.last_hidden_state", "hidden_states = outputs[0]",
    "hidden_states = transformer_outputs.last_hidden_state", "hidden_states = transformer_outputs[0]",
    "hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)",
    "slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep",
    "logits = self.lm_head(hidden_states)", "logits = self.lm_head(hidden_states[:, slice_indices, :])",
    "logits = self.lm_head(hidden_states).contiguous()", "logits = self.lm_head(hidden_states).float()",
    "lm_logits = self.lm_head(hidden_states)", "logits = self.embed_out(hidden_states)",
    "logits = self.lm_head(hidden_states.to(dtype=self.lm_head.weight.dtype))",
    "logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()",
}
_BACKBONE_OUT = r"\w*outputs(?:\.last_hidden_state|\[0\])"
_HEAD_START = re.compile(rf"hidden_states = (?:slice_logits_to_keep\()?{_BACKBONE_OUT}")
_STANDARD_START = re.compile(rf"hidden_states = (?:{_BACKBONE_OUT}|slice_logits_to_keep\({_BACKBONE_OUT}, "
                             r"logits_to_keep\))")
_DICT_MASKS = re.compile(r"isinstance\(\s*(?:causal_mask_mapping\s*:=\s*)?attention_mask\s*,\s*dict\s*\)")


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers ``PreTrainedModel`` under PEFT and ``torch.compile`` wrappers."""
    return peft_base(getattr(model, "_orig_mod", model))  # PEFT: LoRA layers live inside the base model


def text_config(base: torch.nn.Module):
    cfg: Any = base.config  # a transformers PretrainedConfig
    try:
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    except (AttributeError, ValueError):  # a composite config whose text part cannot be told apart
        return cfg


def backbone_of(base: torch.nn.Module) -> tuple[torch.nn.Module | None, str]:
    """(the decoder under the LM head, ""), or (None, why) when ``base_model_prefix`` does not name a submodule
    (e.g. ``Llama4ForCausalLM``: prefix ``language_model``, decoder at ``model``): then nothing is guessed and
    the engine runs the model's own forward."""
    prefix = getattr(base, "base_model_prefix", "") or ""
    backbone = getattr(base, prefix, None) if prefix else None
    if isinstance(backbone, torch.nn.Module) and backbone is not base:
        return backbone, ""
    return None, f"{type(base).__name__} has no submodule {prefix!r} (its base_model_prefix)"


def output_head(base: torch.nn.Module) -> torch.nn.Module | None:
    """The LM head (``get_output_embeddings``), or None when the model does not say."""
    try:
        head = base.get_output_embeddings()  # type: ignore[operator]  # a transformers model's method
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return head if isinstance(head, torch.nn.Module) else None


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def head_rule(base: torch.nn.Module) -> tuple[HeadRule | None, str]:
    """(the model's logit transform, how it was found); (None, why) when it is not known."""
    cfg = text_config(base)
    composite = getattr(base.config, "model_type", "")  # a VLM's own rule first (its text config holds the values)
    rule = HEAD_RULES.get(composite) if composite in COMPOSITE_HEAD_RULES else HEAD_RULES.get(
        getattr(cfg, "model_type", ""))
    if rule is not None:
        found = rule(cfg)
        return found, f"{cfg.model_type}: {found.describe()}"
    src = _source(type(base).forward)
    start, end = _HEAD_START.search(src), src.find("loss = None")
    if start is None or end < start.start():
        return None, f"{type(base).__name__}.forward: LM head not found in its code"
    lines = [ln.strip() for ln in src[start.start():end].splitlines()]
    extra = [ln for ln in lines if ln and not ln.startswith("#") and ln not in STANDARD_HEAD_LINES
             and not _STANDARD_START.fullmatch(ln)]
    if extra:
        return None, f"{type(base).__name__}.forward transforms its logits ({extra[0]!r})"
    return HeadRule(), "logits = lm_head(h)"


def head_parameters(head: torch.nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor,
                                                        torch.Tensor | None] | None:
    """(input map, weight, bias) with ``head(h) == input_map(h) @ weight.T + bias`` for the head as it runs now,
    LoRA included; None when the head is of a kind we cannot read (then the model's own head is used).

    LoRA on the head (``y = h W^T + b + s * drop(h) A^T B^T``) is read exactly as one matmul over widened
    features: ``[h, s * drop(h) A^T] @ [W, B]^T + b``, so A, B and h get their gradients through autograd.
    """
    from_peft = _peft_head(head)
    if from_peft is not None:
        return from_peft if from_peft != "unsupported" else None
    # a plain Linear (subclasses only when they keep Linear's forward: quantized heads do not)
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        return None
    if not isinstance(head.weight, torch.Tensor) or head.weight.dim() != 2:
        return None
    return (lambda h: h), head.weight, head.bias


def _peft_head(head: torch.nn.Module):
    """LoRA / modules_to_save heads: (map, weight, bias), "unsupported", or None when ``head`` is not peft's."""
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if isinstance(head, ModulesToSaveWrapper):
        active = head.active_adapters if not head.disable_adapters else []
        inner = head.modules_to_save[active[0]] if active and active[0] in head.modules_to_save else \
            head.original_module
        return head_parameters(inner) or "unsupported"
    if not isinstance(head, LoraLayer):
        return None
    base = head.get_base_layer()
    found = head_parameters(base)
    if found is None:
        return "unsupported"
    _, weight, bias = found
    if head.disable_adapters or head.merged:
        return found
    names = [n for n in head.active_adapters if n in head.lora_A]
    if any(head.use_dora.get(n) for n in names) or not all(
            isinstance(head.lora_A[n], torch.nn.Linear) for n in names):
        return "unsupported"
    if not names:
        return found

    def widen(h: torch.Tensor) -> torch.Tensor:
        parts = [h] + [head.scaling[n] * head.lora_A[n](head.lora_dropout[n](h)).to(h.dtype) for n in names]
        return torch.cat(parts, dim=-1)  # [T, H + sum r]

    w = torch.cat([weight] + [cast(torch.Tensor, head.lora_B[n].weight).to(weight.dtype) for n in names], dim=1)  # [V, H + sum r]
    return widen, w, bias


@dataclass
class EnginePlan:
    """What the engine may do for one model (see the module docstring). ``notes`` say why something is off."""

    head: HeadRule | None
    layouts: set[str]
    windows: dict[str, int | None] = field(default_factory=dict)
    dict_masks: bool = False
    aux: dict[str, Any] | None = None
    router_logits: bool = False  # the model takes ``output_router_logits`` (MoE): the engine always sets it
    head_note: str = ""  # how the head rule was found, or why there is none
    layout_note: str = ""  # why tree layouts are off, if they are
    verified: bool = False  # the probe ran (or was switched off) for this model
    vision: VisionPlan | None = None  # how batches with images run (a vision-language model), else None


def attention_plan(base: torch.nn.Module, backbone: torch.nn.Module) -> tuple[set[str], dict[str, int | None],
                                                                                bool, str]:
    """(tree layouts the backbone takes exactly, window per layer type, dict of masks?, why not, if not)."""
    cfg = text_config(base)
    fwd = _source(type(backbone).forward)
    if "position_ids" not in inspect.signature(type(backbone).forward).parameters:
        return set(), {}, False, f"{type(backbone).__name__} takes no position_ids"
    if getattr(cfg, "alibi", False) or getattr(cfg, "position_embedding_type", None) == "alibi":
        return set(), {}, False, "ALiBi positions are built from the attention mask"
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        windows = {t: (window if t == "sliding_attention" else None) for t in set(types)}
        unknown = sorted(set(windows) - {"full_attention", "sliding_attention"})
        if unknown:
            return set(), {}, False, f"attention layer types {unknown} take no tree mask"
    elif window and "create_sliding_window_causal_mask" in fwd:
        windows = {"sliding_attention": window}  # one sliding window for every layer (Mistral, Phi-3, ...)
    else:
        windows = {"full_attention": None}
    if any(w is not None and w <= 0 for w in windows.values()):
        return set(), {}, False, f"sliding window {window} is not positive"
    dict_masks = bool(_DICT_MASKS.search(fwd))
    if len(windows) > 1 and not dict_masks:
        return set(), {}, False, f"{type(backbone).__name__} mixes attention layer types but takes one mask"
    return set(TREE_LAYOUTS), windows, dict_masks, ""


def aux_plan(base: torch.nn.Module, coef: float | None = None) -> dict[str, Any] | None:
    """TRL 1.16's MoE load-balancing term: on when the config has ``output_router_logits`` and the coefficient
    (``coef``, else the config's ``router_aux_loss_coef``) is non-zero. None otherwise."""
    cfg = text_config(base)
    if not hasattr(cfg, "output_router_logits"):
        return None
    coef = float(getattr(cfg, "router_aux_loss_coef", 0.0) if coef is None else coef)
    if coef == 0.0:
        return None
    fn = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    if fn is None:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as fn
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    return {"coef": coef, "fn": fn, "num_experts": experts, "top_k": getattr(cfg, "num_experts_per_tok", None)}


def fallback_plan(why: str) -> EnginePlan:
    """The plain path only: the model's own forward and head (full logits), plain rows; ``why`` is the note the
    probe's one line shows."""
    return EnginePlan(head=None, layouts={PLAIN}, head_note=why, layout_note=why)


def engine_plan(model: torch.nn.Module, router_aux_loss_coef: float | None = None) -> EnginePlan:
    """The static plan for ``model`` (cached on it; ``engine.probe.verify`` may narrow it further).

    A model whose structure the tables and code reading cannot follow (no backbone at ``base_model_prefix``,
    no readable head, an error while reading its code or config) gets ``fallback_plan``: its own forward,
    never a crash. The MoE router loss is still read from the config where it can be."""
    base: Any = base_model(model)  # a transformers model: its attributes are dynamic to mypy
    cached = getattr(base, "_dpo_engine_plan", None)
    if cached is not None:
        return cached
    try:
        aux = aux_plan(base, router_aux_loss_coef)
        router_logits = hasattr(text_config(base), "output_router_logits")
    except Exception:  # an unreadable config: no router loss term, as for a dense model
        aux, router_logits = None, False
    backbone, why = backbone_of(base)
    if backbone is None or output_head(base) is None:
        plan = fallback_plan(why or f"{type(base).__name__} names no output head (get_output_embeddings)")
    else:
        try:
            head, head_note = head_rule(base)
            layouts, windows, dict_masks, layout_note = attention_plan(base, backbone)
            plan = EnginePlan(head=head, layouts={PLAIN} | layouts, windows=windows, dict_masks=dict_masks,
                              head_note=head_note, layout_note=layout_note)
        except Exception as exc:  # whatever cannot be read goes to the model's own forward
            plan = fallback_plan(f"{type(base).__name__}: structure not readable ({type(exc).__name__}: {exc})")
    plan.aux, plan.router_logits = aux, router_logits
    try:
        plan.vision = vision_plan(base, backbone, plan.layouts)
    except Exception as exc:  # an unreadable vision structure: images in the plain layout, the model's own forward
        plan.vision = VisionPlan(image_token_id=None, note=f"{type(exc).__name__}: {exc}")
    base._dpo_engine_plan = plan
    return plan
