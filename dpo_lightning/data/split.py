"""The held-out split of one source: whole prompts are held out, never single rows.

    held = held_out_mask(rows, val_fraction=0.15, seed=42, from_pairs=dm.from_pairs)   # bool per row
    dm.val_rows, dm.train_rows = rows.take(np.flatnonzero(held)), rows.take(np.flatnonzero(~held))

Rows that share a prompt (the same prompt token ids) form one group: pairs, KTO's unpaired rows and pairs split
into unpaired rows alike (both rows of a split pair follow the group of the pair's first row). A share
``val_fraction`` of the groups (at least one, rounded) goes to validation, chosen by a seeded permutation of
the groups in order of first appearance: the split depends only on the rows and the seed (no process hash
randomization, no rank), so every DDP rank computes the same one. A held-out prompt is then unseen in training,
and the held-out metrics measure generalization, not memory.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from dpo_lightning.data.formats import DataError
from dpo_lightning.data.store import TokenRows


def prompt_groups(rows, *, from_pairs: bool = False) -> np.ndarray:
    """int64 [N]: the group of each row of ``rows`` (a ``TokenRows`` or a list of row dicts), numbered in
    order of first appearance; rows with the same prompt ids share a group, and so do a split pair's rows."""
    if isinstance(rows, TokenRows):  # straight from the mapped arrays, without building rows
        keys, index = rows.prompt_bytes(), rows.index
    else:
        keys = (np.asarray(r["prompt_ids"], dtype="<i4").tobytes() for r in rows)
        index = np.asarray([r["index"] for r in rows], dtype=np.int64)
    ids: dict[bytes, int] = {}
    groups = np.empty(len(index), dtype=np.int64)
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(key, digest_size=16).digest()
        groups[i] = ids.setdefault(digest, len(ids))
    if from_pairs:  # rows 2i and 2i+1 are one source pair: both take the group of the pair's first row
        pair = np.asarray(index) // 2
        first: dict[int, int] = {}
        for i, p in enumerate(pair.tolist()):
            groups[i] = first.setdefault(p, int(groups[i]))
        _, first_row, inverse = np.unique(groups, return_index=True, return_inverse=True)
        rank = np.empty(len(first_row), dtype=np.int64)
        rank[np.argsort(first_row)] = np.arange(len(first_row))  # renumbered 0..n-1, in order of first appearance
        groups = rank[inverse.reshape(-1)]
    return groups


def held_out_mask(rows, *, val_fraction: float, seed: int, from_pairs: bool = False,
                  where: str = "data") -> np.ndarray:
    """bool [N]: the rows held out for validation (see the module docstring)."""
    groups = prompt_groups(rows, from_pairs=from_pairs)
    n = int(groups.max()) + 1 if len(groups) else 0
    if n < 2:
        raise DataError(f"{where}: data.val_fraction={val_fraction} holds out whole prompts, and every row has "
                        "the same prompt; give a held-out file with data.val_path, or set data.val_fraction=0")
    count = min(n - 1, max(1, int(round(val_fraction * n))))  # at least one prompt on each side
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.isin(groups, order[:count])
