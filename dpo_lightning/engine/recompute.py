"""Selective activation recomputation (``engine.recompute_pointwise``, on by default): keep what the matmuls
and attention produced, recompute the cheap rest in the backward.

Autograd keeps, for each decoder layer, every tensor its backward needs: for a Llama-style layer about 12 values
per token and hidden unit (norm inputs and outputs, rotary outputs, the repeated keys and values, the MLP's
``act(gate)`` and ``act(gate) * up``, ...). Under this option each decoder layer of the policy runs inside
``torch.utils.checkpoint`` with a selective policy (``create_selective_checkpoint_contexts``): the outputs of
every operator are kept **except** a fixed list of elementwise and view operators (``RECOMPUTE_OPS``), which the
backward recomputes from the kept ones. The matmuls and the attention kernel are never run twice; what is
recomputed is norms, activations, rotary embeddings, residual additions and copies, a few percent of a step's
time. Activation memory drops by ~45% on SmolLM2's shape (``docs/performance.md``).

Exact: the recomputed operators are deterministic functions of kept tensors, so the backward sees bitwise the
same values (``tests/test_recompute.py`` compares gradients with the option off on every family of
``tests/arch_families.py``). Anything not on the list (dropout, MoE routing, custom kernels) is kept as autograd
would keep it. A kept tensor that the layer later changes in place (MoE layers accumulate their experts'
outputs with ``index_add_``) cannot be kept: the first time a layer runs with gradients, one extra forward of
it (random state restored, its graph dropped) looks for such a write, and a layer that has one runs as it was,
with one printed line. Steps aside entirely (0 layers) for a model whose decoder layers it cannot find, a
quantized model (its kept dequantized weights would cost more than they save), and when whole layers are
already recomputed (``engine.gradient_checkpointing``, FSDP's ``activation_checkpointing``) or compiled
(``engine.compile``), and under DeepSpeed (not tested there).
"""

from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dpo_lightning.models.quirks import backbone_of, base_model

_aten = torch.ops.aten
# Deterministic elementwise operators and views: recomputed in the backward instead of kept. (A view kept would
# keep its whole base alive, so views are recomputed too; they cost nothing.)
RECOMPUTE_OPS = frozenset({
    _aten.add.Tensor, _aten.add.Scalar, _aten.sub.Tensor, _aten.mul.Tensor, _aten.mul.Scalar, _aten.div.Tensor,
    _aten.neg.default, _aten.pow.Tensor_Scalar, _aten.rsqrt.default, _aten.sqrt.default, _aten.mean.dim,
    _aten.silu.default, _aten.gelu.default, _aten.relu.default, _aten.tanh.default, _aten.sigmoid.default,
    _aten.cat.default, _aten.clone.default, _aten._to_copy.default,
    _aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.t.default, _aten.transpose.int,
    _aten.permute.default, _aten.expand.default, _aten.slice.Tensor, _aten.select.int, _aten.unsqueeze.default,
    _aten.squeeze.dim, _aten.detach.default, _aten.alias.default,
})


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.PREFER_RECOMPUTE if op in RECOMPUTE_OPS else CheckpointPolicy.MUST_SAVE


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The backbone's repeated blocks (``layers``, ``h``, ``blocks``, ``decoder.layers``), or [] when unknown."""
    base = base_model(model)
    backbone = backbone_of(base)[0] or base
    for path in ("layers", "h", "blocks", "decoder.layers", "encoder.layers", "model.layers"):  # model.layers: a
        # base_model_prefix naming no submodule (Gemma 3 / Llama 4 text under transformers 4.57 / 5)
        mod = backbone
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, torch.nn.ModuleList) and len(mod):
            return list(mod)
    return []


def is_quantized(model: torch.nn.Module) -> bool:
    base = base_model(model)
    return bool(getattr(base, "is_quantized", False) or getattr(base, "is_loaded_in_4bit", False)
                or getattr(base, "is_loaded_in_8bit", False)
                or getattr(getattr(base, "config", None), "quantization_config", None))


def enable_selective_recompute(model: torch.nn.Module) -> int:
    """Run each decoder layer of ``model`` under the selective policy while gradients are on (a no-grad forward:
    the layer as it was). Returns the number of layers wrapped (0: stepped aside); idempotent."""
    if is_quantized(model):
        return 0
    layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer, "_dpo_recompute", False):
            continue
        if "_dpo_recompute_fn" not in vars(layer):  # made once: the in-place probe's verdict is kept with it
            layer._dpo_recompute_fn = _wrapped(layer.forward)
        layer.forward = layer._dpo_recompute_fn
        layer._dpo_recompute = True
    return len(layers)


def disable_selective_recompute(model: torch.nn.Module) -> None:
    for layer in decoder_layers(model):
        if getattr(layer, "_dpo_recompute", False):
            del layer.forward  # the instance attribute: the class's forward again
            layer._dpo_recompute = False


def _storage(t: torch.Tensor) -> int | None:
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return None
    return st.data_ptr() if st.nbytes() else None


class _InPlaceOnKept(TorchDispatchMode):
    """Records the first operator that writes in place into a tensor the selective policy would keep."""

    def __init__(self):
        super().__init__()
        self.kept: set[int] = set()
        self.found: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.found is None and func._schema.is_mutable:
            for i, arg in enumerate(func._schema.arguments):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    value = args[i] if i < len(args) else kwargs.get(arg.name)
                    for t in tree_leaves(value):
                        if isinstance(t, torch.Tensor) and _storage(t) in self.kept:
                            self.found = str(func)
        out = func(*args, **kwargs)
        if func not in RECOMPUTE_OPS:
            self.kept.update(k for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                             and (k := _storage(t)) is not None)
        return out


_REPORTED: set[str] = set()


def _writes_kept_tensor(forward, args, kwargs) -> str | None:
    """One forward of the layer (gradients on, so the operators are those of the real step; its graph is
    dropped unused); the in-place write into a kept tensor it makes, if any."""
    devices = [t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_cuda][:1]
    with torch.random.fork_rng(devices=devices), _InPlaceOnKept() as probe:
        forward(*args, **kwargs)
    return probe.found


def _wrapped(forward):
    context = functools.partial(create_selective_checkpoint_contexts, _policy)
    state: dict[str, bool] = {}  # "safe": decided at the first forward with gradients

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if "safe" not in state:
            found = _writes_kept_tensor(forward, args, kwargs)
            state["safe"] = found is None
            owner = type(getattr(forward, "__self__", forward)).__name__
            if found and owner not in _REPORTED:
                _REPORTED.add(owner)
                print(f"[dpo_lightning] engine.recompute_pointwise: {owner} writes in place into a tensor it would "
                      f"keep ({found}); its layers run without selective recomputation")
        if not state["safe"]:
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context, **kwargs)

    run.recompute_state = state
    return run


def recompute_status(model: torch.nn.Module) -> list[bool | None]:
    """Per decoder layer: True (selective), False (stepped aside: in-place write), None (not run yet / off)."""
    return [vars(layer)["forward"].recompute_state.get("safe") if getattr(layer, "_dpo_recompute", False) else None
            for layer in decoder_layers(model)]
