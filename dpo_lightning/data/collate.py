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

Other layouts (``layout=``) hold the same sequences (same ``score_seq`` numbering, same ``score_tgt`` and
``score_pos`` values, so every loss sees identical inputs) in fewer tokens:

    prefix_shared    one row per prompt: [prompt | chosen | rejected], the prompt computed once; positions
                     restart at len(prompt) for each completion (``position_ids``) and the 4D mask built from
                     ``segment_ids`` / ``branch_ids`` (``logprobs.tree_attention_mask``) hides the chosen
                     tokens from the rejected ones. Unpaired rows with KL pairs share prompt i likewise.
    packed           the prefix-shared units of the whole batch in one row, no padding (4D mask).
    packed_unshared  every sequence (prompt + completion) in one row, positions restarting per sequence:
                     the padding-free layout flash-attention varlen kernels take (``segment_ids`` only).

Those layouts add ``position_ids``, ``segment_ids`` (-1 on padding) and, with prefix sharing, ``branch_ids``
(0 prompt, 1 first completion, 2 second); ``attention_mask`` stays the 2D real-token mask (for counting),
and ``completion_mask`` marks completion tokens.
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


LAYOUTS = ("plain", "prefix_shared", "packed", "packed_unshared")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"data.layout={layout!r}: use one of {', '.join(LAYOUTS)}")
    return layout


def tree_layout(units: list[tuple[list[int], list[tuple[list[int], int]]]], pad_token_id: int, *,
                pack: bool, shared: bool = True, multiple_of: int | None = None) -> dict[str, Any]:
    """Rows of prompt trees: each unit is (prompt, [(completion, sequence id), ...]).

    ``shared``: the completions of a unit follow one copy of its prompt (branch ids 1, 2, ...); otherwise
    each completion gets its own copy (a separate segment, no branch ids). ``pack``: every unit in one row;
    otherwise one unit per row. Rows are right-padded (segment -1, position 0) to the longest, rounded up to
    ``multiple_of``.
    """
    rows: list[dict[str, list[int]]] = []
    src_row, src_col, tgts, seqs, poss = [], [], [], [], []
    segment = 0

    def new_row():
        rows.append({"ids": [], "pos": [], "seg": [], "br": [], "comp": []})
        return rows[-1]

    row = new_row() if pack else None
    for prompt, completions in units:
        groups = [completions] if shared else [[c] for c in completions]
        for group in groups:
            if not pack:
                row = new_row()
            r, P = len(rows) - 1, len(prompt)
            if P == 0:
                raise ValueError("every row needs at least one prompt token (the first completion token is "
                                 "predicted from the last prompt token)")
            start = len(row["ids"])
            row["ids"] += prompt
            row["pos"] += range(P)
            row["seg"] += [segment] * P
            row["br"] += [0] * P
            row["comp"] += [0] * P
            last_prompt = start + P - 1
            for b, (comp, seq) in enumerate(group, start=1):
                c0, n = len(row["ids"]), len(comp)
                row["ids"] += comp
                row["pos"] += range(P, P + n)
                row["seg"] += [segment] * n
                row["br"] += [b if shared else 0] * n
                row["comp"] += [1] * n
                # token j of the completion is predicted by the previous token of its own sequence: the last
                # prompt token for j = 0 (shared by all completions), else completion token j - 1
                src_row += [r] * n
                src_col += [last_prompt] + list(range(c0, c0 + n - 1))
                tgts += comp
                seqs += [seq] * n
                poss += range(1, n + 1)
            segment += 1

    def mat(key, pad):
        return pad_sequences([x[key] for x in rows], pad, multiple_of)

    batch: dict[str, Any] = {
        "input_ids": mat("ids", pad_token_id),
        "attention_mask": mat("seg", -1).ge(0).long(),
        "completion_mask": mat("comp", 0),
        "position_ids": mat("pos", 0),
        "segment_ids": mat("seg", -1),
    }
    if shared:
        batch["branch_ids"] = mat("br", 0)
    L = batch["input_ids"].size(1)
    batch.update({
        "score_src": torch.tensor(src_row, dtype=torch.long) * L + torch.tensor(src_col, dtype=torch.long),
        "score_tgt": torch.tensor(tgts, dtype=torch.long),
        "score_seq": torch.tensor(seqs, dtype=torch.long),
        "score_pos": torch.tensor(poss, dtype=torch.long),
    })
    return batch


def layout_batch(layout: str, prompts: list[list[int]], completions: list[list[list[int]]], pad_token_id: int,
                 multiple_of: int | None = None) -> dict[str, Any]:
    """One batch of ``layout``: prompt i with its completions ``completions[k][i]`` for k = 0, 1, ...; the
    sequence of completion k of prompt i has id k * len(prompts) + i (the plain layout's row order)."""
    B, K = len(prompts), len(completions)
    if layout == "plain":
        batch = plain_layout(prompts * K, [c for comp in completions for c in comp], pad_token_id, multiple_of)
    else:
        units = [(prompts[i], [(completions[k][i], k * B + i) for k in range(K)]) for i in range(B)]
        batch = tree_layout(units, pad_token_id, pack=layout != "prefix_shared",
                            shared=layout != "packed_unshared", multiple_of=multiple_of)
    batch["num_sequences"] = B * K
    return batch


@dataclass
class PreferenceCollator:
    """Collate tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) into the paired contract."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    layout: str = "plain"

    def __post_init__(self):
        check_layout(self.layout)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [r["prompt_ids"] for r in rows]
        completions = [[r["chosen_ids"] for r in rows], [r["rejected_ids"] for r in rows]]
        batch = layout_batch(self.layout, prompts, completions, self.pad_token_id, self.pad_to_multiple_of)
        return _add_common(batch, rows)


@dataclass
class UnpairedCollator:
    """Collate unpaired rows (``prompt_ids``, ``completion_ids``, ``label``) into the unpaired contract."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    kl_pairs: bool = False
    layout: str = "plain"
    from_pairs: bool = False  # rows 2i, 2i+1 are pair i's chosen and rejected: batches carry ``pair`` ids

    def __post_init__(self):
        check_layout(self.layout)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [r["prompt_ids"] for r in rows]
        completions = [[r["completion_ids"] for r in rows]]
        if self.kl_pairs:  # prompt i with completion i-1: TRL KTOTrainer's mismatched KL pairs
            completions.append(completions[0][-1:] + completions[0][:-1])
        batch = layout_batch(self.layout, prompts, completions, self.pad_token_id, self.pad_to_multiple_of)
        batch["label"] = torch.tensor([bool(r["label"]) for r in rows])
        batch = _add_common(batch, rows)
        if self.from_pairs:  # lets the module score reward accuracy on pairs whose two rows share a batch
            batch["pair"] = batch["index"] // 2
        return batch


REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_shared_logps", "ref_rejected_shared_logps",
            "ref_logps", "ref_kl_logps")


def _add_common(batch: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    batch["index"] = torch.tensor([int(r.get("index", -1)) for r in rows], dtype=torch.long)
    for key in REF_KEYS:
        if key in rows[0]:
            batch[key] = torch.tensor([float(r[key]) for r in rows], dtype=torch.float32)
    return batch
