"""Collators: one documented batch contract for every loss.

Paired batch of B pairs (``PreferenceCollator``), plain layout (TRL 1.16's ``DataCollatorForPreference``):

    input_ids        [2B, L]  rows 0..B-1: prompt+chosen, rows B..2B-1: prompt+rejected, right-padded
    attention_mask   [2B, L]  1 on real tokens
    completion_mask  [2B, L]  1 on completion tokens
    score_src/tgt/seq/pos [T] the completion tokens to score (see ``logprobs.py``)
    index            [B]      dataset row of each pair (reference-cache lookups)
    num_sequences    int      2B
    ref_chosen_logps, ref_rejected_logps [B]  only when the dataset carries precomputed reference log-probs

Unpaired batch (KTO, ``UnpairedCollator``): the same with rows 0..B-1 = prompt+completion, ``label`` [B]
(bool) and, when ``kl_pairs`` is on, rows B..2B-1 = prompt i + completion (i-1) mod B, the mismatched pairs
TRL's KTOTrainer uses for its KL estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dpo_lightning.logprobs import score_index


def pad_sequences(seqs: list[list[int]], pad_value: int, multiple_of: int | None = None) -> torch.Tensor:
    """Right-pad lists of ints into one [N, L] long tensor (L rounded up to ``multiple_of``)."""
    L = max(len(s) for s in seqs)
    if multiple_of:
        L = -(-L // multiple_of) * multiple_of
    out = torch.full((len(seqs), L), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def plain_layout(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int,
                 multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """One row per (prompt, completion) sequence, right-padded, with the score index."""
    ids = [p + c for p, c in zip(prompts, completions)]
    masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)]
    input_ids = pad_sequences(ids, pad_token_id, multiple_of)
    batch = {
        "input_ids": input_ids,
        "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, multiple_of),
        "completion_mask": pad_sequences(masks, 0, multiple_of),
    }
    batch.update(score_index(input_ids, batch["completion_mask"]))
    batch["num_sequences"] = len(ids)
    return batch


@dataclass
class PreferenceCollator:
    """Collate tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) into the paired contract."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [r["prompt_ids"] for r in rows]
        completions = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        batch = plain_layout(prompts + prompts, completions, self.pad_token_id, self.pad_to_multiple_of)
        return _add_common(batch, rows)


@dataclass
class UnpairedCollator:
    """Collate unpaired rows (``prompt_ids``, ``completion_ids``, ``label``) into the unpaired contract."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    kl_pairs: bool = False

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [r["prompt_ids"] for r in rows]
        completions = [r["completion_ids"] for r in rows]
        if self.kl_pairs:  # prompt i with completion i-1: TRL KTOTrainer's mismatched KL pairs
            prompts = prompts + prompts
            completions = completions + completions[-1:] + completions[:-1]
        batch = plain_layout(prompts, completions, self.pad_token_id, self.pad_to_multiple_of)
        batch["label"] = torch.tensor([bool(r["label"]) for r in rows])
        return _add_common(batch, rows)


def _add_common(batch: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    batch["index"] = torch.tensor([int(r.get("index", -1)) for r in rows], dtype=torch.long)
    for key in ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps"):
        if key in rows[0]:
            batch[key] = torch.tensor([float(r[key]) for r in rows], dtype=torch.float32)
    return batch
