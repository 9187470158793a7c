"""Sequence log-probabilities of completions: completion positions only, chunked LM head, fp32 softmax.

The batch names the tokens to score with four flat index tensors (built by the collator, any layout):

    score_src [T]  row of the flattened hidden states [N*L, H] that predicts the token
    score_tgt [T]  the token id being scored
    score_seq [T]  which sequence it belongs to (paired: chosen i -> i, rejected i -> B + i)
    score_pos [T]  1-based position inside its completion (for LD-DPO's shared-length split)

Only these T hidden rows go through the LM head, ``chunk_size`` rows at a time, inside one autograd
Function (``_ChunkedLogProb``), so no [N, L, V] logits tensor ever exists. Log-softmax is computed in fp32
through a logsumexp. For the backward the Function keeps ``d logp / d logits = onehot - softmax`` of as many
rows as fit in ``softmax_cache_mb`` (no second LM-head matmul for them: forward 2HV + backward 4HV FLOPs per
token, the minimum) and recomputes the logits of the rest chunk by chunk (8HV, bounded memory).

Layouts (see ``data/collate.py``): a plain batch carries a 2D ``attention_mask``; a tree/packed batch carries
``segment_ids`` / ``branch_ids`` / ``position_ids`` and gets a 4D mask built here (``tree_attention_mask``):
a token attends to earlier tokens of its own segment that are in the shared prompt (branch 0) or in its own
branch, so a pair's rejected completion never sees its chosen one, and each sequence sees exactly the
context it has in the plain layout, at the same positions.

What the head does to its logits (Gemma's softcapping, Granite's / Cohere's logit scaling, LoRA on the head),
which layouts a model takes exactly (sliding-window layers, positions) and the MoE router loss come from
``models/quirks.py`` (``EnginePlan``); a batch in a layout the model cannot take is turned back into the plain
layout, and a head the plan does not know runs as the model's own. Under autocast (``bf16-mixed``) the head's
matmul runs in the autocast dtype, as the model's own ``lm_head`` would.

``full_logits=True`` is the plain path (the model's own forward and LM head, full log-softmax) that the
exactness tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dpo_lightning.data.layouts import PLAIN, batch_layout, to_plain
from dpo_lightning.engine.attention import attn_implementation, model_inputs, tree_attention_mask
from dpo_lightning.engine.vision import has_images
from dpo_lightning.models.quirks import (
    AUX_LAYOUTS,
    EnginePlan,
    backbone_of,
    base_model,
    engine_plan,
    head_parameters,
    output_head,
)

__all__ = ["SeqLogps", "chunked_logprobs", "sequence_logps", "split_model", "attn_implementation",
           "model_inputs", "tree_attention_mask", "enable_gradient_checkpointing", "compile_backbone"]


@dataclass
class SeqLogps:
    """Per-sequence and per-token results of one forward. S sequences, T scored tokens."""

    logps: torch.Tensor  # [S] sum of token log-probs (fp32, differentiable)
    lengths: torch.Tensor  # [S] number of scored tokens
    token_logps: torch.Tensor  # [T] per-token log-probs (fp32, differentiable)
    seq: torch.Tensor  # [T] sequence id of each token
    pos: torch.Tensor  # [T] 1-based position in its completion
    logits_sum: torch.Tensor  # [S] sum over tokens of the vocabulary-mean logit (no grad; TRL's logits/*)
    log_sum_sq: torch.Tensor | None = None  # [T] log sum_v p_v^2 (no grad; WPO weights), if asked
    aux_loss: torch.Tensor | None = None  # [] MoE router load-balancing loss (policy of an MoE model), if asked


def _fold_chunk(z: torch.Tensor, tgt: torch.Tensor, want_sq: bool, keep_grad: bool):
    """In place on fp32 logits z [c, V]: returns (logp, lse, log_sum_sq); z becomes onehot(tgt) - softmax
    when ``keep_grad`` (the logits gradient of logp, up to the incoming scalar per row), else exp(z - max)."""
    target = z.gather(1, tgt[:, None]).squeeze(1)
    m = z.amax(1, keepdim=True)
    m.masked_fill_(~torch.isfinite(m), 0.0)
    e = z.sub_(m).exp_()
    s = e.sum(1)
    lse = m.squeeze(1) + s.log()
    sq = None
    if want_sq:  # log sum_v p_v^2 = log sum e^2 - 2 log sum e
        sq = 2 * (torch.linalg.vector_norm(e, dim=1).log() - s.log())
    if keep_grad:
        e.mul_((-1.0 / s)[:, None])
        e.scatter_add_(1, tgt[:, None], torch.ones_like(s)[:, None])
    return target - lse, lse, sq


def _transform(z: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """In place: z <- softcap(scale * z), the model's own logit transform (``quirks.HeadRule``)."""
    if scale != 1.0:
        z.mul_(scale)
    if softcap:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _mm_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             scale: float = 1.0, softcap: float | None = None, cast: torch.dtype | None = None) -> torch.Tensor:
    """out[c, V] (fp32) = softcap(scale * (h W^T + b)), without a fresh [c, V] allocation when the dtypes allow.
    ``cast``: the matmul's dtype under autocast (weight and bias already cast). In a low precision the transform
    runs there too, as in the model's forward, and the result is widened to fp32."""
    if cast is None and h.dtype == torch.float32 and weight.dtype == torch.float32:
        torch.mm(h, weight.t(), out=out)
        if bias is not None:
            out.add_(bias.float())
        return _transform(out, scale, softcap)
    z = F.linear(h.to(cast or weight.dtype), weight, bias)  # a hidden state in another dtype meets the head's
    out.copy_(_transform(z, scale, softcap) if z.dtype != torch.float32 else z)
    return out if z.dtype != torch.float32 else _transform(out, scale, softcap)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force on ``device_type`` (bf16-mixed / 16-mixed), or None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class _ChunkedLogProb(torch.autograd.Function):
    """log softmax(softcap(scale * (h W^T + b)))[tgt] for T rows, chunked, fp32; see the module docstring for
    the memory rule. Under autocast the matmuls run in its dtype (forward and backward), as ``lm_head`` would."""

    @staticmethod
    def forward(ctx, h, weight, bias, tgt, chunk_size, softcap, want_sq, cache_bytes, scale=1.0):
        ctx.set_materialize_grads(False)
        T, V = h.size(0), weight.size(0)
        cast = _autocast_dtype(h.device.type)
        w_c = weight.to(cast) if cast is not None else weight  # autocast's own cast, once per call
        b_c = bias.to(cast) if cast is not None and bias is not None else bias
        grad = any(ctx.needs_input_grad[:3])
        # rows whose logits gradient is kept from the forward (never with softcapping: its derivative
        # needs the capped logits, so those chunks are recomputed instead)
        n_keep = 0 if (not grad or softcap) else min(T, int(cache_bytes) // (4 * V))
        logp = h.new_empty(T, dtype=torch.float32)
        lse = h.new_empty(T, dtype=torch.float32)
        log_sum_sq = h.new_empty(T, dtype=torch.float32) if want_sq else None
        kept = h.new_empty(n_keep, V, dtype=torch.float32) if n_keep else None
        buf = h.new_empty(min(chunk_size, T - n_keep), V, dtype=torch.float32) if T > n_keep else None
        mean_logit = h.new_empty(T, dtype=torch.float32) if softcap else None
        bounds = [(s, min(s + chunk_size, n_keep)) for s in range(0, n_keep, chunk_size)]
        bounds += [(s, min(s + chunk_size, T)) for s in range(n_keep, T, chunk_size)]
        for s, e in bounds:
            z = kept[s:e] if e <= n_keep else buf[: e - s]
            _mm_into(z, h[s:e], w_c, b_c, scale, softcap, cast)
            if softcap:  # not linear in h: mean of the capped logits, from the chunk (metric only)
                mean_logit[s:e] = z.mean(1)
            logp[s:e], lse[s:e], sq = _fold_chunk(z, tgt[s:e], want_sq, keep_grad=e <= n_keep)
            if want_sq:
                log_sum_sq[s:e] = sq
        if not softcap:  # mean_v scale (h W^T + b)_v = scale (h . mean_v W_v + mean(b)): O(TH), not a pass over [T, V]
            w_mean = weight.mean(0, dtype=torch.float32)
            mean_logit = h.float() @ w_mean + (bias.float().mean() if bias is not None else 0.0)
            if scale != 1.0:
                mean_logit = mean_logit * scale
        ctx.save_for_backward(h, weight, bias, tgt, lse, kept)
        ctx.chunk_size, ctx.softcap, ctx.n_keep, ctx.scale, ctx.cast = chunk_size, softcap, n_keep, scale, cast
        ctx.mark_non_differentiable(mean_logit)
        if want_sq:
            ctx.mark_non_differentiable(log_sum_sq)
        return logp, mean_logit, log_sum_sq

    @staticmethod
    def backward(ctx, grad_logp, _g_mean, _g_sq):
        h, weight, bias, tgt, lse, kept = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        if grad_logp is None:
            return None, None, None, None, None, None, None, None, None
        cs, softcap, n_keep, scale, cast = ctx.chunk_size, ctx.softcap, ctx.n_keep, ctx.scale, ctx.cast
        with torch.autocast(h.device.type, enabled=False):  # the dtypes below are explicit
            return _ChunkedLogProb._backward(h, weight, bias, tgt, lse, kept, grad_logp, need_h, need_w, need_b,
                                             cs, softcap, n_keep, scale, cast)

    @staticmethod
    def _backward(h, weight, bias, tgt, lse, kept, grad_logp, need_h, need_w, need_b, cs, softcap, n_keep, scale,
                  cast):
        # d logp / d raw logits = scale * (onehot(tgt) - softmax) [* softcap'(z)], times the incoming gradient
        g = grad_logp.float() * scale
        mm_dtype = cast or weight.dtype  # the dtype of the head's matmuls (the autocast dtype under autocast)
        w_mm = weight.to(mm_dtype)
        grad_h = torch.empty_like(h) if need_h else None
        T = h.size(0)
        grad_w = grad_b = None
        if n_keep:  # kept rows: dz = g * (onehot - p); no logits recompute
            gk = g[:n_keep, None]
            if need_h:
                grad_h[:n_keep] = ((kept.to(mm_dtype) @ w_mm).float() * gk).to(h.dtype)
            if need_w:  # a fresh product, no zero-filled [V, H] buffer
                grad_w = torch.mm(kept.t(), h[:n_keep].float() * gk)
            if need_b:
                grad_b = gk.squeeze(1) @ kept
        if need_w and grad_w is None:
            grad_w = torch.zeros_like(weight, dtype=torch.float32)
        if need_b and grad_b is None:
            grad_b = torch.zeros_like(bias, dtype=torch.float32)
        buf = h.new_empty(min(cs, T - n_keep), weight.size(0), dtype=torch.float32) if T > n_keep else None
        b_mm = bias.to(mm_dtype) if bias is not None and cast is not None else bias
        for s in range(n_keep, T, cs):
            e = min(s + cs, T)
            hc = h[s:e]
            z = _mm_into(buf[: e - s], hc, w_mm, b_mm, scale, softcap, cast)
            if softcap:
                dcap = 1 - (z / softcap) ** 2  # z = c tanh(raw / c)  ->  dz / draw = 1 - (z / c)^2
            dz = z.sub_(lse[s:e, None]).exp_().neg_()
            dz.scatter_add_(1, tgt[s:e, None], torch.ones_like(dz[:, :1]))
            dz.mul_(g[s:e, None])
            if softcap:
                dz.mul_(dcap)
            if need_h:
                grad_h[s:e] = (dz.to(mm_dtype) @ w_mm).to(h.dtype)
            if need_w:
                if cast is None:
                    grad_w.addmm_(dz.t(), hc.float())
                else:  # as the model's lm_head backward under autocast: a matmul in the autocast dtype
                    grad_w += (dz.to(cast).t() @ hc.to(cast)).float()
            if need_b:
                grad_b += dz.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None, None, None)


def chunked_logprobs(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tgt: torch.Tensor, *,
                     chunk_size: int = 1024, softcap: float | None = None, want_sq: bool = False,
                     softmax_cache_mb: float = 512, scale: float = 1.0):
    """(token log-probs [T], mean logit [T], log sum p^2 [T] or None) of ``tgt`` under
    ``softcap(scale * (h W^T + b))``."""
    return _ChunkedLogProb.apply(h, weight, bias, tgt, max(int(chunk_size), 1), softcap, want_sq,
                                 int(softmax_cache_mb * 2**20), float(scale))


def split_model(model: torch.nn.Module):
    """(backbone, lm_head) of a causal LM, through PEFT and compile wrappers; either is None when the model's
    structure does not say (then only the model's own forward is used)."""
    base = base_model(model)
    return backbone_of(base)[0], output_head(base)


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_sequences: int, *,
                   chunk_size: int = 1024, full_logits: bool = False, want_sq: bool = False,
                   softmax_cache_mb: float = 512, aux_loss: bool = False, plan: EnginePlan | None = None) -> SeqLogps:
    """Run ``model`` on the batch layout and return per-sequence completion log-probs (see module doc).

    ``plan`` (default: ``quirks.engine_plan(model)``, narrowed by the probe when it ran) says which layouts and
    head the model takes exactly; a batch in another layout runs as the plain layout, an unknown head as the
    model's own. ``aux_loss``: also return the MoE router loss when the plan has one (the policy's forward).
    """
    plan = plan or engine_plan(model)
    backbone, head = split_model(model)
    readable = plan.head is not None and backbone is not None and head is not None and not full_logits
    params = head_parameters(head) if readable else None
    want_aux = aux_loss and plan.aux is not None
    layouts = plan.layouts
    if want_aux:  # the model's own forward computes its router loss from a 2D mask: plain rows only
        layouts = layouts & (AUX_LAYOUTS if params is not None else {PLAIN})
    if has_images(batch):  # images: the layouts the model takes with them (models/vision_plan.py)
        layouts = layouts & (plan.vision.layouts if plan.vision is not None else {PLAIN})
    if batch_layout(batch) not in layouts:
        batch = to_plain(batch)
    kwargs = model_inputs(model, batch, plan)
    if plan.router_logits:  # never let an MoE model compute its router loss from a 4D mask
        kwargs["output_router_logits"] = want_aux
    src, tgt = batch["score_src"], batch["score_tgt"]
    if params is None:  # the plain path: the model's own forward and LM head, full log-softmax
        outputs = model(**kwargs)
        logits = outputs.logits.float()  # [N, L, V]
        flat = logits.reshape(-1, logits.size(-1))[src]  # [T, V]
        logp_all = flat.log_softmax(-1)
        token_logps = logp_all.gather(1, tgt[:, None]).squeeze(1)
        mean_logit = flat.detach().mean(-1)
        log_sum_sq = torch.logsumexp(2 * logp_all.detach(), -1) if want_sq else None
    else:
        outputs = backbone(**kwargs)
        hidden = outputs.last_hidden_state  # [N, L, H]
        widen, weight, bias = params
        assert plan.head is not None  # params come from the plan's head
        h = widen(hidden.reshape(-1, hidden.size(-1))[src])  # [T, H(+r)]: completion positions only
        token_logps, mean_logit, log_sum_sq = chunked_logprobs(
            h, weight, bias, tgt, chunk_size=chunk_size, softcap=plan.head.softcap, want_sq=want_sq,
            softmax_cache_mb=softmax_cache_mb, scale=plan.head.scale)
    seq = batch["score_seq"]
    logps = token_logps.new_zeros(num_sequences).index_add(0, seq, token_logps)
    lengths = torch.bincount(seq, minlength=num_sequences)
    logits_sum = mean_logit.new_zeros(num_sequences).index_add(0, seq, mean_logit.detach())
    aux = None
    router_logits = getattr(outputs, "router_logits", None)  # None: a forward that does not return them
    if want_aux and router_logits is not None:  # the model's own load-balancing loss over every real token
        a = plan.aux                             # (2D mask), as TRL adds it
        assert a is not None  # want_aux
        aux = a["fn"](router_logits, a["num_experts"], a["top_k"], batch["attention_mask"])
    return SeqLogps(logps, lengths, token_logps, seq, batch["score_pos"], logits_sum, log_sum_sq, aux)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (Hugging Face's per-layer checkpointing,
    non-reentrant): activation memory O(layers) -> O(1) layers, for about one extra backbone forward."""
    base: Any = base_model(model)  # a transformers model: its methods are dynamic to mypy
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_backbone(model: torch.nn.Module, **compile_kwargs) -> None:
    """``torch.compile`` the backbone's decoder layers in place (regional compilation: one graph reused by
    every layer, shapes dynamic; state-dict keys unchanged, so checkpoints and export are unaffected)."""
    backbone = split_model(model)[0] or base_model(model)  # no readable backbone: the whole model
    layers = getattr(backbone, "layers", None) or getattr(backbone, "h", None)
    compile_kwargs.setdefault("dynamic", True)
    if isinstance(layers, torch.nn.ModuleList) and len(layers):
        for layer in layers:
            layer.compile(**compile_kwargs)
    else:
        backbone.compile(**compile_kwargs)
