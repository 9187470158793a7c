"""Sequence log-probabilities of completions: completion positions only, chunked LM head, fp32 softmax.

The batch names the tokens to score with four flat index tensors (built by the collator, any layout):

    score_src [T]  row of the flattened hidden states [N*L, H] that predicts the token
    score_tgt [T]  the token id being scored
    score_seq [T]  which sequence it belongs to (paired: chosen i -> i, rejected i -> B + i)
    score_pos [T]  1-based position inside its completion (for LD-DPO's shared-length split)

Only these T hidden rows go through the LM head, ``chunk_size`` rows at a time, inside one autograd
Function that recomputes each chunk's logits in backward, so neither [N, L, V] nor [T, V] logits are kept.
``full_logits=True`` is the plain path (the model's own forward, full log-softmax) used by exactness tests.
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


class _ChunkedLogProb(torch.autograd.Function):
    """log softmax(h W^T + b)[tgt] for T rows, chunked; recomputes logits in backward."""

    @staticmethod
    def forward(ctx, h, weight, bias, tgt, chunk_size, softcap, want_sq):
        T = h.size(0)
        logp = h.new_empty(T, dtype=torch.float32)
        lse = h.new_empty(T, dtype=torch.float32)
        mean_logit = h.new_empty(T, dtype=torch.float32)
        log_sum_sq = h.new_empty(T, dtype=torch.float32) if want_sq else None
        for s in range(0, T, chunk_size):
            z = _logits(h[s:s + chunk_size], weight, bias, softcap)  # [c, V] fp32
            lse_c = torch.logsumexp(z, dim=-1)
            lse[s:s + chunk_size] = lse_c
            logp[s:s + chunk_size] = z.gather(1, tgt[s:s + chunk_size, None]).squeeze(1) - lse_c
            mean_logit[s:s + chunk_size] = z.mean(-1)
            if want_sq:  # log sum_v p_v^2 = logsumexp(2 z) - 2 lse
                log_sum_sq[s:s + chunk_size] = torch.logsumexp(2 * z, dim=-1) - 2 * lse_c
        ctx.save_for_backward(h, weight, bias, tgt, lse)
        ctx.chunk_size, ctx.softcap = chunk_size, softcap
        ctx.mark_non_differentiable(mean_logit)
        if want_sq:
            ctx.mark_non_differentiable(log_sum_sq)
        return logp, mean_logit, log_sum_sq

    @staticmethod
    def backward(ctx, grad_logp, _g_mean, _g_sq):
        h, weight, bias, tgt, lse = ctx.saved_tensors
        cs, softcap = ctx.chunk_size, ctx.softcap
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for s in range(0, h.size(0), cs):
            hc = h[s:s + cs]
            z = _logits(hc, weight, bias, softcap)
            # d logp / d z = onehot(tgt) - softmax(z), scaled by the incoming per-token gradient
            dz = -torch.exp(z - lse[s:s + cs, None])
            dz.scatter_add_(1, tgt[s:s + cs, None], torch.ones_like(dz[:, :1]))
            dz.mul_(grad_logp[s:s + cs, None].float())
            if softcap:  # z = c * tanh(raw / c)  ->  d z / d raw = 1 - (z / c)^2
                dz.mul_(1 - (z / softcap) ** 2)
            if need_h:
                grad_h[s:s + cs] = (dz.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                grad_w.addmm_(dz.t(), hc.float())
            if need_b:
                grad_b += dz.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None):
    z = F.linear(h, weight, bias).float()
    return softcap * torch.tanh(z / softcap) if softcap else z


def split_model(model: torch.nn.Module):
    """(backbone, lm_head, softcap) of a causal LM, through PEFT and compile wrappers."""
    base = getattr(model, "_orig_mod", model)
    if hasattr(base, "get_base_model"):  # peft.PeftModel: LoRA layers live inside the base model
        base = base.get_base_model()
    backbone = getattr(base, base.base_model_prefix)
    return backbone, base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_sequences: int, *,
                   chunk_size: int = 1024, full_logits: bool = False, want_sq: bool = False) -> SeqLogps:
    """Run ``model`` on the batch layout and return per-sequence completion log-probs (see module doc)."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
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
        token_logps, mean_logit, log_sum_sq = _ChunkedLogProb.apply(
            h, head.weight, head.bias, tgt, chunk_size, softcap, want_sq)
    seq = batch["score_seq"]
    logps = token_logps.new_zeros(num_sequences).index_add(0, seq, token_logps)
    lengths = torch.bincount(seq, minlength=num_sequences)
    logits_sum = mean_logit.new_zeros(num_sequences).index_add(0, seq, mean_logit.detach())
    return SeqLogps(logps, lengths, token_logps, seq, batch["score_pos"], logits_sum, log_sum_sq)

