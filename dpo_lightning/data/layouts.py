"""Batch layouts: the token arrangement of a batch, built from token lists on the data side and read by the
engine (``engine/attention.py`` builds the masks, ``engine/logprobs.py`` scores the tokens).

    plain            one right-padded row per (prompt, completion) sequence (TRL's layout)
    prefix_shared    one row per prompt: [prompt | completion 1 | completion 2], the prompt computed once
    packed           the prefix-shared units of a whole batch in one row, no padding
    packed_unshared  every sequence in one row, positions restarting per sequence (flash-attention varlen)

Every layout names the tokens to score with four flat index tensors of T entries (``score_index``):
``score_src`` (row of the flattened hidden states [N*L, H] that predicts the token), ``score_tgt`` (the token
id), ``score_seq`` (the sequence: paired chosen i -> i, rejected i -> B + i) and ``score_pos`` (1-based position
in its completion), with the same values in every layout, so that every loss sees identical inputs.
"""

from __future__ import annotations

from typing import Any

import torch

PLAIN = "plain"
PREFIX_SHARED = "prefix_shared"
PACKED = "packed"
PACKED_UNSHARED = "packed_unshared"
LAYOUTS = (PLAIN, PREFIX_SHARED, PACKED, PACKED_UNSHARED)
TREE_LAYOUTS = (PREFIX_SHARED, PACKED, PACKED_UNSHARED)  # carry segment_ids (a 4D mask)
SHARED_LAYOUTS = (PREFIX_SHARED, PACKED)  # share each prompt between its completions (branch_ids)


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
                 multiple_of: int | None = None) -> dict[str, Any]:
    """One row per (prompt, completion) sequence, right-padded, with the score index."""
    ids = [p + c for p, c in zip(prompts, completions)]
    masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)]
    input_ids = pad_sequences(ids, pad_token_id, multiple_of)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, multiple_of),
        "completion_mask": pad_sequences(masks, 0, multiple_of),
    }
    batch.update(score_index(input_ids, batch["completion_mask"]))
    batch["num_sequences"] = len(ids)
    return batch


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
    poss: list[int]
    src_row, src_col, tgts, seqs, poss = [], [], [], [], []
    segment = 0

    def new_row() -> dict[str, list[int]]:
        rows.append({"ids": [], "pos": [], "seg": [], "br": [], "comp": []})
        return rows[-1]

    row = new_row() if pack else None
    for prompt, completions in units:
        groups = [completions] if shared else [[c] for c in completions]
        for group in groups:
            if not pack:
                row = new_row()
            assert row is not None  # the packed row, or this unit's own
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
    if layout == PLAIN:
        batch = plain_layout(prompts * K, [c for comp in completions for c in comp], pad_token_id, multiple_of)
    else:
        units = [(prompts[i], [(completions[k][i], k * B + i) for k in range(K)]) for i in range(B)]
        batch = tree_layout(units, pad_token_id, pack=layout != PREFIX_SHARED,
                            shared=layout != PACKED_UNSHARED, multiple_of=multiple_of)
    batch["num_sequences"] = B * K
    return batch


def batch_layout(batch: dict[str, Any]) -> str:
    """The kind of mask a collated batch needs: ``plain``, ``packed_unshared``, or ``prefix_shared`` (for both
    prefix-sharing layouts, ``prefix_shared`` and ``packed``: the same tree mask, one row or many)."""
    if batch.get("segment_ids") is None:
        return PLAIN
    return PREFIX_SHARED if batch.get("branch_ids") is not None else PACKED_UNSHARED


def to_plain(batch: dict[str, Any]) -> dict[str, Any]:
    """The same sequences as a plain batch (one right-padded row each, row s = sequence s), so that ``score_seq``,
    ``score_tgt`` and ``score_pos`` keep their meaning. For models that cannot take a layout's tree mask."""
    ids, seg, comp = batch["input_ids"], batch["segment_ids"], batch["completion_mask"].bool()
    L = ids.size(1)
    src, tgt, seq, pos = batch["score_src"], batch["score_tgt"], batch["score_seq"], batch["score_pos"]
    S = int(batch["num_sequences"])
    first = (pos == 1).nonzero(as_tuple=True)[0]  # the first completion token of each sequence
    prompts: list[list[int]] = [[] for _ in range(S)]
    completions: list[list[int]] = [[] for _ in range(S)]
    for t in first.tolist():  # its source is the last prompt token: the prompt is that segment's prompt part
        r, c = divmod(int(src[t]), L)
        cols = ((seg[r] == seg[r, c]) & ~comp[r]).nonzero(as_tuple=True)[0]
        prompts[int(seq[t])] = ids[r, cols].tolist()
    for t in torch.argsort(seq * (L + 1) + pos).tolist():
        completions[int(seq[t])].append(int(tgt[t]))
    images = bool(batch.get("vision"))
    if images and batch.get("branch_ids") is None:  # packed_unshared: one row per segment, its images as they are
        order = _segment_order(batch, first, L)
        out = plain_layout([prompts[s] for s in order], [completions[s] for s in order], pad_token_id=0)
        out["score_seq"] = torch.tensor(order, dtype=torch.long)[out["score_seq"]]
        out["vision"] = dict(batch["vision"])
    else:
        out = plain_layout(prompts, completions, pad_token_id=0)
        if images:
            out["vision"] = _plain_images(batch, seg, S)
    return {**{k: v for k, v in batch.items() if k not in ("position_ids", "segment_ids", "branch_ids")}, **out}


def image_dim(key: str, vision: dict[str, Any]) -> int:
    """The dimension of ``vision[key]`` that lists images: 1 for Idefics3 / SmolVLM's ``pixel_values`` and
    ``pixel_attention_mask`` ([1, images, ...], one row holding every image), else 0."""
    pixels = vision.get("pixel_values")
    if key in ("pixel_values", "pixel_attention_mask") and "pixel_attention_mask" in vision and \
            pixels is not None and pixels.dim() == 5 and pixels.size(0) == 1:
        return 1
    return 0


def _segment_order(batch: dict[str, Any], first: torch.Tensor, L: int) -> list[int]:
    """The sequences in the order their segments come in the rows (row-major): the order of their images."""
    seg, src, seq = batch["segment_ids"], batch["score_src"], batch["score_seq"]
    where = {int(seq[t]): int(seg.view(-1)[src[t]]) for t in first.tolist()}
    return sorted(where, key=lambda s: where[s])


def _plain_images(batch: dict[str, Any], seg: torch.Tensor, sequences: int) -> dict[str, Any]:
    """A prefix-sharing batch's images (each unit's once, units in order) for its plain rows: sequence s of unit
    i is s = k * units + i, so the plain rows read the whole block of images once per completion k."""
    units = int(seg.unique().ge(0).sum())
    times = sequences // units
    vision = batch["vision"]
    return {k: torch.cat([v] * times, dim=image_dim(k, vision)) if torch.is_tensor(v) else v
            for k, v in vision.items()}
