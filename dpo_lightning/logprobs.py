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

``full_logits=True`` is the plain path (the model's own forward and LM head, full log-softmax) that the
exactness tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def score_index(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Index tensors for the plain layout (one sequence per row, TRL's ``completion_mask``).

    Row r, column t scores ``input_ids[r, t]`` from hidden state [r, t-1]; column 0 is never scored.
    """
    mask = completion_mask.bool().clone()
    mask[:, 0] = False
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: sequence by sequence, left to right
    pos = mask.long().cumsum(1)[rows, cols]
    return {"score_src": rows * mask.size(1) + cols - 1, "score_tgt": input_ids[rows, cols],
            "score_seq": rows, "score_pos": pos}


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


def _mm_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """out[c, V] (fp32) = h W^T + b, without a fresh [c, V] allocation when the dtypes allow."""
    if h.dtype == torch.float32 and weight.dtype == torch.float32:
        torch.mm(h, weight.t(), out=out)
        if bias is not None:
            out.add_(bias.float())
    else:
        out.copy_(F.linear(h, weight, bias))
    return out


class _ChunkedLogProb(torch.autograd.Function):
    """log softmax(h W^T + b)[tgt] for T rows, chunked, fp32; see the module docstring for the memory rule."""

    @staticmethod
    def forward(ctx, h, weight, bias, tgt, chunk_size, softcap, want_sq, cache_bytes):
        ctx.set_materialize_grads(False)
        T, V = h.size(0), weight.size(0)
        grad = any(ctx.needs_input_grad[:3])
        # rows whose logits gradient is kept from the forward (never with softcapping: its derivative
        # needs the capped logits, so those chunks are recomputed instead)
        n_keep = 0 if (not grad or softcap) else min(T, int(cache_bytes) // (4 * V))
        logp = h.new_empty(T, dtype=torch.float32)
        lse = h.new_empty(T, dtype=torch.float32)
        log_sum_sq = h.new_empty(T, dtype=torch.float32) if want_sq else None
        kept = h.new_empty(n_keep, V, dtype=torch.float32) if n_keep else None
        buf = h.new_empty(min(chunk_size, T - n_keep), V, dtype=torch.float32) if T > n_keep else None
        bounds = [(s, min(s + chunk_size, n_keep)) for s in range(0, n_keep, chunk_size)]
        bounds += [(s, min(s + chunk_size, T)) for s in range(n_keep, T, chunk_size)]
        for s, e in bounds:
            z = kept[s:e] if e <= n_keep else buf[: e - s]
            _mm_into(z, h[s:e], weight, bias)
            if softcap:
                z.div_(softcap).tanh_().mul_(softcap)
            logp[s:e], lse[s:e], sq = _fold_chunk(z, tgt[s:e], want_sq, keep_grad=e <= n_keep)
            if want_sq:
                log_sum_sq[s:e] = sq
        if softcap:  # not linear in h: mean of the capped logits, chunk by chunk (metric only)
            mean_logit = torch.cat([_logits(h[s:s + chunk_size], weight, bias, softcap).mean(-1)
                                    for s in range(0, T, chunk_size)]) if T else logp.new_zeros(0)
        else:  # mean_v (h W^T + b)_v = h . mean_v W_v + mean(b): O(TH) instead of a pass over [T, V]
            w_mean = weight.mean(0, dtype=torch.float32)
            mean_logit = h.float() @ w_mean + (bias.float().mean() if bias is not None else 0.0)
        ctx.save_for_backward(h, weight, bias, tgt, lse, kept)
        ctx.chunk_size, ctx.softcap, ctx.n_keep = chunk_size, softcap, n_keep
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
            return None, None, None, None, None, None, None, None
        cs, softcap, n_keep = ctx.chunk_size, ctx.softcap, ctx.n_keep
        g = grad_logp.float()
        grad_h = torch.empty_like(h) if need_h else None
        T = h.size(0)
        grad_w = grad_b = None
        if n_keep:  # kept rows: dz = g * (onehot - p); no logits recompute
            gk = g[:n_keep, None]
            if need_h:
                grad_h[:n_keep] = ((kept.to(weight.dtype) @ weight).float() * gk).to(h.dtype)
            if need_w:  # a fresh product, no zero-filled [V, H] buffer
                grad_w = torch.mm(kept.t(), h[:n_keep].float() * gk)
            if need_b:
                grad_b = gk.squeeze(1) @ kept
        if need_w and grad_w is None:
            grad_w = torch.zeros_like(weight, dtype=torch.float32)
        if need_b and grad_b is None:
            grad_b = torch.zeros_like(bias, dtype=torch.float32)
        buf = h.new_empty(min(cs, T - n_keep), weight.size(0), dtype=torch.float32) if T > n_keep else None
        for s in range(n_keep, T, cs):
            e = min(s + cs, T)
            hc = h[s:e]
            z = _mm_into(buf[: e - s], hc, weight, bias)
            if softcap:
                z.div_(softcap).tanh_().mul_(softcap)
                dcap = 1 - (z / softcap) ** 2  # z = c tanh(raw / c)  ->  dz / draw = 1 - (z / c)^2
            # d logp / d z = onehot(tgt) - softmax(z), scaled by the incoming per-token gradient
            dz = z.sub_(lse[s:e, None]).exp_().neg_()
            dz.scatter_add_(1, tgt[s:e, None], torch.ones_like(dz[:, :1]))
            dz.mul_(g[s:e, None])
            if softcap:
                dz.mul_(dcap)
            if need_h:
                grad_h[s:e] = (dz.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                grad_w.addmm_(dz.t(), hc.float())
            if need_b:
                grad_b += dz.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None, None)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None):
    z = F.linear(h, weight, bias).float()
    return softcap * torch.tanh(z / softcap) if softcap else z


def chunked_logprobs(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tgt: torch.Tensor, *,
                     chunk_size: int = 1024, softcap: float | None = None, want_sq: bool = False,
                     softmax_cache_mb: float = 512):
    """(token log-probs [T], mean logit [T], log sum p^2 [T] or None) of ``tgt`` under ``h W^T + b``."""
    return _ChunkedLogProb.apply(h, weight, bias, tgt, max(int(chunk_size), 1), softcap, want_sq,
                                 int(softmax_cache_mb * 2**20))


def split_model(model: torch.nn.Module):
    """(backbone, lm_head, softcap) of a causal LM, through PEFT and compile wrappers."""
    base = getattr(model, "_orig_mod", model)
    if hasattr(base, "get_base_model"):  # peft.PeftModel: LoRA layers live inside the base model
        base = base.get_base_model()
    backbone = getattr(base, base.base_model_prefix)
    return backbone, base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)


def attn_implementation(model: torch.nn.Module) -> str:
    """The attention backend a model runs (``sdpa``, ``eager``, ``flash_attention_2``, ...)."""
    base = getattr(model, "_orig_mod", model)
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    return str(getattr(base.config, "_attn_implementation", None) or "eager")


def tree_attention_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor | None = None, *,
                        additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """4D mask [N, 1, L, L] for packed / prefix-shared rows: query q sees key k iff k <= q, both are in the
    same segment, and k is in the shared prompt (branch 0) or in q's branch. Padding (segment -1) only sees
    padding, so no query row is empty (no NaN). Boolean (True = attend) for SDPA, or additive (0 / -inf-ish)
    in ``additive_dtype`` for eager attention."""
    L = segment_ids.size(1)
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril_()
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    if branch_ids is not None:
        mask &= (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    mask = mask[:, None]
    if additive_dtype is not None:
        mask = torch.zeros(mask.shape, dtype=additive_dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(additive_dtype).min)
    return mask


def model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """Keyword arguments of the backbone / model forward for any layout of ``collate.py``."""
    kwargs: dict[str, torch.Tensor | bool | None] = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    seg = batch.get("segment_ids")
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
    kwargs["attention_mask"] = tree_attention_mask(seg, branch, additive_dtype=dtype)
    return kwargs


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_sequences: int, *,
                   chunk_size: int = 1024, full_logits: bool = False, want_sq: bool = False,
                   softmax_cache_mb: float = 512) -> SeqLogps:
    """Run ``model`` on the batch layout and return per-sequence completion log-probs (see module doc)."""
    kwargs = model_inputs(model, batch)
    src, tgt = batch["score_src"], batch["score_tgt"]
    if full_logits:
        logits = model(**kwargs).logits.float()  # [N, L, V]
        flat = logits.reshape(-1, logits.size(-1))[src]  # [T, V]
        logp_all = flat.log_softmax(-1)
        token_logps = logp_all.gather(1, tgt[:, None]).squeeze(1)
        mean_logit = flat.detach().mean(-1)
        log_sum_sq = torch.logsumexp(2 * logp_all.detach(), -1) if want_sq else None
    else:
        backbone, head, softcap = split_model(model)
        hidden = backbone(**kwargs).last_hidden_state  # [N, L, H]
        h = hidden.reshape(-1, hidden.size(-1))[src]  # [T, H]: completion positions only
        token_logps, mean_logit, log_sum_sq = chunked_logprobs(
            h, head.weight, head.bias, tgt, chunk_size=chunk_size, softcap=softcap, want_sq=want_sq,
            softmax_cache_mb=softmax_cache_mb)
    seq = batch["score_seq"]
    logps = token_logps.new_zeros(num_sequences).index_add(0, seq, token_logps)
    lengths = torch.bincount(seq, minlength=num_sequences)
    logits_sum = mean_logit.new_zeros(num_sequences).index_add(0, seq, mean_logit.detach())
    return SeqLogps(logps, lengths, token_logps, seq, batch["score_pos"], logits_sum, log_sum_sq)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (Hugging Face's per-layer checkpointing,
    non-reentrant): activation memory O(layers) -> O(1) layers, for about one extra backbone forward."""
    base = getattr(model, "_orig_mod", model)
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_backbone(model: torch.nn.Module, **compile_kwargs) -> None:
    """``torch.compile`` the backbone's decoder layers in place (regional compilation: one graph reused by
    every layer, shapes dynamic; state-dict keys unchanged, so checkpoints and export are unaffected)."""
    backbone, _, _ = split_model(model)
    layers = getattr(backbone, "layers", None) or getattr(backbone, "h", None)
    compile_kwargs.setdefault("dynamic", True)
    if isinstance(layers, torch.nn.ModuleList) and len(layers):
        for layer in layers:
            layer.compile(**compile_kwargs)
    else:
        backbone.compile(**compile_kwargs)
