"""The probe: before the first step, the fast log-prob path is compared with the model's own forward.

``models/quirks.py`` knows what it knows (logit transforms, sliding windows, positions, LoRA heads, MoE); this
catches what it does not. A couple of short random sequences (two prompts, two completions each; longer than
a small sliding window) go through

    the model's own forward       plain layout, full logits (``full_logits=true``): the reference numbers
    the chunked LM head           plain layout
    each tree / packed layout     ``prefix_shared`` (= ``packed``'s mask) and ``packed_unshared``

in eval mode without gradients, in the model's dtype. Any path whose per-token log-probs differ (beyond the
float noise of the dtype) is dropped from the model's ``EnginePlan``: the head falls back to the model's own,
the layout to the plain one. ``verify`` returns one line saying what changed and why (None when nothing did);
``engine.verify=false`` skips the probe and trusts the static plan.
"""

from __future__ import annotations

import torch

from dpo_lightning.data.layouts import PACKED_UNSHARED, PLAIN, PREFIX_SHARED, TREE_LAYOUTS, batch_layout
from dpo_lightning.models.quirks import (
    AUX_LAYOUTS,
    EnginePlan,
    base_model,
    engine_plan,
    output_head,
    text_config,
)
from dpo_lightning.models.vision_plan import multimodal_token_ids

# per-token log-prob tolerance: |fast - own| <= atol + rtol * |own|
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-8, 1e-8)}
LOW_PRECISION_TOLERANCE = (0.1, 0.02)  # bf16 / fp16 weights: attention kernels differ by layout


class EngineCheckError(RuntimeError):
    """The model's own forward cannot serve as the reference (non-finite log-probs)."""


def probe_batches(vocab_size: int, window: int | None, device: torch.device,
                  exclude: set[int] | frozenset[int] = frozenset()) -> dict[str, dict]:
    """The probe's two prompts with two completions each, in every layout (rows longer than a small window), of
    random text tokens: never one of ``exclude`` (a VLM's image tokens, which would ask for pixels)."""
    from dpo_lightning.data.layouts import layout_batch

    g = torch.Generator().manual_seed(1234)
    extra = window + 2 if window is not None and window <= 48 else 0

    def text_token(t: int) -> int:
        while t in exclude:
            t = (t + 1) % vocab_size
        return t

    def toks(n):
        return [text_token(t) for t in torch.randint(0, vocab_size, (n,), generator=g).tolist()]

    prompts = [toks(5 + extra), toks(3)]
    completions = [[toks(4), toks(2 + extra)], [toks(3 + extra), toks(5)]]
    out = {}
    for layout in (PLAIN, PREFIX_SHARED, PACKED_UNSHARED):
        batch = layout_batch(layout, prompts, completions, pad_token_id=0)
        out[layout] = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return out


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)


def _token_logps(model, batch, **kw) -> torch.Tensor:
    from dpo_lightning.engine.logprobs import sequence_logps

    out = sequence_logps(model, batch, batch["num_sequences"], **kw)
    order = torch.argsort(out.seq * 10_000 + out.pos)
    return out.token_logps.float()[order]


def _differs(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float | None:
    """The worst deviation when beyond tolerance, else None."""
    atol, rtol = _tolerance(dtype)
    err = (got - ref).abs()
    if bool(torch.isfinite(got).all()) and bool((err <= atol + rtol * ref.abs()).all()):
        return None
    return float(err.nan_to_num(float("inf")).max())


def check(model: torch.nn.Module, plan: EnginePlan | None = None, *, chunk_size: int = 1024,
          full_logits: bool = False) -> list[str]:
    """Probe ``model`` (as it runs now: adapters on or off) and narrow ``plan`` in place; returns the changes.
    ``full_logits``: the run uses the model's own head anyway (ZeRO-3 / FSDP2): only the layouts are probed."""
    plan = plan or engine_plan(model)
    if (plan.head is None or full_logits) and not plan.layouts - {PLAIN}:
        return []  # only the model's own forward runs: nothing to compare
    base = base_model(model)
    param = next(model.parameters())
    amp = param.device.type
    dtype = torch.get_autocast_dtype(amp) if torch.is_autocast_enabled(amp) else param.dtype
    windows = [w for w in plan.windows.values() if w is not None]
    vocab = int(getattr(text_config(base), "vocab_size", 0) or getattr(output_head(base), "out_features", 0)
                or base.get_input_embeddings().num_embeddings)  # type: ignore[operator]  # transformers
    batches = probe_batches(vocab, min(windows) if windows else None, param.device,
                            exclude=multimodal_token_ids(base.config))
    own_plan = EnginePlan(head=None, layouts={PLAIN})
    ref = _token_logps(model, batches[PLAIN], plan=own_plan, full_logits=True)
    if not bool(torch.isfinite(ref).all()):
        raise EngineCheckError(f"{type(base).__name__}: the model's own forward gives non-finite log-probs on "
                               "the probe; the fast path cannot be checked (set engine.verify=false to skip)")
    changes: list[str] = []
    if plan.head is not None and not full_logits:
        err = _differs(_token_logps(model, batches[PLAIN], plan=plan, chunk_size=chunk_size), ref, dtype)
        if err is not None:
            changes.append(f"chunked LM head ({plan.head.describe()}) -> the model's own head "
                           f"(log-probs off by {err:.2g})")
            plan.head = None
    for layout in (PREFIX_SHARED, PACKED_UNSHARED):
        if layout not in plan.layouts:
            continue
        batch = batches[layout]
        assert batch_layout(batch) == layout
        err = _differs(_token_logps(model, batch, plan=plan, chunk_size=chunk_size, full_logits=full_logits),
                       ref, dtype)
        if err is not None:
            dropped = [x for x in TREE_LAYOUTS if x != PACKED_UNSHARED] if layout == PREFIX_SHARED else [layout]
            plan.layouts = plan.layouts - set(dropped)
            changes.append(f"layout {'/'.join(dropped)} -> plain (log-probs off by {err:.2g})")
    return changes


def static_changes(plan: EnginePlan, aux: bool = False, head: bool = True) -> list[str]:
    """What the static plan (``quirks.py``) already turned off, and why (``aux``: for the forward that also
    returns the MoE router loss; ``head``: the run would use the chunked head)."""
    out = []
    if plan.head is None and head:
        out.append(f"chunked LM head -> the model's own head ({plan.head_note})")
    off = [x for x in TREE_LAYOUTS if x not in plan.layouts]
    if off:
        out.append(f"layout {'/'.join(off)} -> plain ({plan.layout_note})")
    off_aux = [x for x in TREE_LAYOUTS if x in plan.layouts and x not in AUX_LAYOUTS]
    if aux and plan.aux is not None and off_aux:
        out.append(f"layout {'/'.join(off_aux)} -> plain (the MoE router loss counts each sequence's prompt)")
    return out


def verify(model: torch.nn.Module, *, label: str, chunk_size: int = 1024, adapter_states: bool = False,
           probe: bool = True, aux: bool = False, full_logits: bool = False) -> list[str]:
    """Probe ``model`` once (cached on its plan) in eval mode without gradients; ``adapter_states``: also with
    its PEFT adapters disabled (the ``adapter`` reference). Returns ``"<label>: <change>"`` lines, the static
    plan's exclusions first. ``probe=False``: only those (``engine.verify=false``)."""
    plan = engine_plan(model)
    if plan.verified:
        return []
    static = static_changes(plan, aux, head=not full_logits)
    if not probe:
        plan.verified = True
        return [f"{label}: {c}" for c in static]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            changes = check(model, plan, chunk_size=chunk_size, full_logits=full_logits)
            if adapter_states:
                with model.disable_adapter():  # type: ignore[operator]  # PEFT's method
                    changes += [f"{c} (adapters off)"
                                for c in check(model, plan, chunk_size=chunk_size, full_logits=full_logits)]
    finally:
        model.train(was_training)
    plan.verified = True
    return [f"{label}: {c}" for c in static + changes]


def summary(lines: list[str]) -> str | None:
    """The one line the run prints when the probe changed anything."""
    if not lines:
        return None
    return "[dpo_lightning] engine, exact path instead of the fast one: " + "; ".join(lines) + \
        " (engine.verify=false skips the probe)"



def check_images(model: torch.nn.Module, batch: dict, *, label: str, chunk_size: int = 1024,
                 full_logits: bool = False) -> list[str]:
    """Once per model, on the first batch with images in a tree layout: that batch against the model's own
    forward on its plain rows (each image given once per sequence, TRL's way). A difference turns that kind of
    layout off for batches with images (``VisionPlan.layouts``); returns the changes."""
    from dpo_lightning.data.layouts import SHARED_LAYOUTS, to_plain

    plan = engine_plan(model)
    vision = plan.vision
    layout = batch_layout(batch)
    if vision is None or vision.verified or layout == PLAIN:
        return []
    vision.verified = True
    kind = set(SHARED_LAYOUTS) if layout == PREFIX_SHARED else {PACKED_UNSHARED}
    if not kind & vision.layouts:
        return []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            own = EnginePlan(head=None, layouts={PLAIN}, vision=vision)
            ref = _token_logps(model, to_plain(batch), plan=own, full_logits=True)
            err = _differs(_token_logps(model, batch, plan=plan, chunk_size=chunk_size, full_logits=full_logits),
                           ref, next(model.parameters()).dtype)
    finally:
        model.train(was_training)
    if err is None:
        return []
    vision.layouts = vision.layouts - kind
    vision.note = f"log-probs off by {err:.2g} on the first batch with images"
    return [f"{label}: layout {'/'.join(sorted(kind))} with images -> plain ({vision.note})"]
