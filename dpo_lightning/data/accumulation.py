"""Token-mean terms that do not change with gradient accumulation.

A paired loss's NLL term (SFT, CPO, ORPO, RPO, MPO: TRL's ``nll_loss``) is a mean over the chosen completion
tokens of the batch. Under gradient accumulation Lightning averages K micro-batch losses, so each micro-batch's
own token mean would weigh its tokens by 1 / (its token count): 8 x 1, 4 x 2 and 2 x 4 would give different
gradients. The loader therefore groups the K micro-batches of each optimizer step and writes the step's chosen
token count into each (``step_chosen_tokens``, with ``accumulate`` = K); ``inputs.py`` then divides the micro-batch's
NLL sum by it and multiplies by K, which Lightning's division by K cancels: the step's loss is the token mean over
all its micro-batches, exactly as one batch of the same rows (also for a shorter last window of an epoch).
With K = 1 nothing changes (TRL's per-batch token mean).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch


def chosen_tokens(batch: dict[str, Any]) -> int:
    """Chosen completion tokens of a paired batch (scored sequences 0..B-1)."""
    return int((batch["score_seq"] < batch["index"].numel()).sum())


def with_step_tokens(batches: Iterator[dict[str, Any]], accumulate: int) -> Iterator[dict[str, Any]]:
    """Yield ``batches`` unchanged, except that each of K consecutive paired batches (one optimizer step) gets
    ``step_chosen_tokens`` (the K batches' chosen tokens) and ``accumulate`` (K). Reads K batches ahead."""
    it = iter(batches)
    while group := list(islice(it, accumulate)):
        if all("score_seq" in b and "label" not in b for b in group):
            total = torch.tensor(sum(chosen_tokens(b) for b in group))
            for b in group:
                b["step_chosen_tokens"], b["accumulate"] = total, accumulate
        yield from group
