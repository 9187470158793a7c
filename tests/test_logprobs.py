"""The chunked, completion-only LM head is exact: same log-probs and gradients as the full computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import V, make_rows, run
from torch.utils._python_dispatch import TorchDispatchMode

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.engine.logprobs import chunked_logprobs, sequence_logps
from dpo_lightning.models.tiny import build_model


@pytest.fixture(scope="module")
def model():
    return build_model(V, seed=0, attn_implementation="sdpa").float()


@pytest.mark.parametrize("chunk_size,cache_mb", [(1024, 512), (3, 512), (4, 0), (5, 7 * V * 4 / 2**20)],
                         ids=["one-chunk-kept", "chunks-kept", "chunks-recomputed", "partly-kept"])
def test_chunked_head_matches_full_logits(model, chunk_size, cache_mb):
    batch = PreferenceCollator(0)(make_rows())
    ref_lp, ref_tok, ref_g, ref_out = run(model, batch, full_logits=True)
    lp, tok, g, out = run(model, batch, chunk_size=chunk_size, softmax_cache_mb=cache_mb)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(tok, ref_tok, atol=1e-5, rtol=0)
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], atol=1e-5, rtol=1e-4, msg=k)
    torch.testing.assert_close(out.lengths, ref_out.lengths)
    torch.testing.assert_close(out.logits_sum, ref_out.logits_sum, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("softcap,bias,cache_mb", [(None, True, 512), (30.0, False, 512), (5.0, True, 0)])
def test_chunked_function_gradients_softcap_bias_and_wpo_term(softcap, bias, cache_mb):
    torch.manual_seed(0)
    T, H = 13, 8
    h = torch.randn(T, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True) if bias else None
    tgt = torch.randint(0, V, (T,))
    gout = torch.randn(T)

    z = F.linear(h, W, b)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    logp_all = z.log_softmax(-1)
    ref = logp_all.gather(1, tgt[:, None]).squeeze(1)
    ref_sq = torch.logsumexp(2 * logp_all, -1).detach()
    ref_grads = torch.autograd.grad((ref * gout).sum(), [h, W] + ([b] if bias else []))

    got, mean_logit, sq = chunked_logprobs(h, W, b, tgt, chunk_size=4, softcap=softcap, want_sq=True,
                                           softmax_cache_mb=cache_mb)
    grads = torch.autograd.grad((got * gout).sum(), [h, W] + ([b] if bias else []))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(sq, ref_sq, atol=1e-5, rtol=0)
    torch.testing.assert_close(mean_logit, z.mean(-1).detach(), atol=1e-5, rtol=0)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_no_grad_forward_keeps_nothing_and_matches(model):
    batch = PreferenceCollator(0)(make_rows())
    with torch.no_grad():
        full = sequence_logps(model, batch, 8, full_logits=True).logps
        chunked = sequence_logps(model, batch, 8, chunk_size=4).logps
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def vocab_rows(shapes: list[tuple[int, ...]]) -> int:
    """The most rows (product of the other dimensions) of any tensor with a vocabulary-sized dimension."""
    best = 0
    for s in shapes:
        if V in s:
            n = 1
            for d in s:
                n *= d
            best = max(best, n // V)
    return best


def test_no_full_vocabulary_logits_over_the_prompt_are_allocated():
    model = build_model(V, seed=0, attn_implementation="sdpa", hidden_size=16, intermediate_size=32,
                        num_attention_heads=2, num_key_value_heads=1).float()
    g = torch.Generator().manual_seed(0)
    rows = [dict(prompt_ids=torch.randint(4, V, (60,), generator=g).tolist(),
                 chosen_ids=torch.randint(4, V, (c,), generator=g).tolist(),
                 rejected_ids=torch.randint(4, V, (r,), generator=g).tolist(), index=i)
            for i, (c, r) in enumerate([(9, 7), (8, 10)])]
    for layout in ("plain", "prefix_shared", "packed"):
        batch = PreferenceCollator(0, layout=layout)(rows)
        T = batch["score_tgt"].numel()  # 34 completion tokens scored
        positions = batch["input_ids"].numel()  # >= 2 * 60 prompt positions
        rec = ShapeRecorder()
        with rec:
            out = sequence_logps(model, batch, 4, chunk_size=16)
            out.logps.sum().backward()
        # vocabulary-wide tensors: chunks of completion rows, the kept softmax of the T completion rows, and
        # [V, H] weights and gradients; never one row per position (which would include the prompt)
        assert vocab_rows(rec.shapes) <= max(T, 16), (layout, sorted({s for s in rec.shapes if V in s}))
        assert positions > 2 * T
    # the detector does see the plain path's [N, L, V] logits
    rec = ShapeRecorder()
    with rec, torch.no_grad():
        sequence_logps(model, PreferenceCollator(0)(rows), 4, full_logits=True)
    assert vocab_rows(rec.shapes) >= PreferenceCollator(0)(rows)["input_ids"].numel()
