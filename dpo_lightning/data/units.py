"""Rows that must share a batch and a rank: the units the samplers shuffle and the ranks split.

A split pair (``paired=False`` on paired data: rows 2i, 2i+1 are pair i's chosen and rejected) is one unit,
so reward accuracy can compare the two rows of every pair on any number of ranks. With KTO's KL rows
(``kl_pairs``) every unit holds at least two rows (single rows are joined), because the KL estimate pairs
each prompt with another row's completion of the same batch: no rank ever gets a one-row batch, whatever
the world size. Batches then hold ``ceil(batch_size / 2)`` units: ``batch_size`` rows when units are pairs,
rounded up to whole pairs for an odd ``batch_size``.

Without either, rows are independent and batched as they are (``make_units`` returns None).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def unit_positions(index, *, from_pairs: bool, kl_pairs: bool) -> list[list[int]] | None:
    """Positions of the rows (whose source row numbers are ``index``) grouped into units; None when rows
    stand alone. Works on the index alone, so no row is built (``TokenRows.index``)."""
    if not (from_pairs or kl_pairs):
        return None
    index = [int(i) for i in index]
    units: list[list[int]] = []
    for p, i in enumerate(index):  # rows are in index order: a pair's two rows are neighbours when both survived
        if from_pairs and units and index[units[-1][0]] // 2 == i // 2:
            units[-1].append(p)
        else:
            units.append([p])
    if not kl_pairs:
        return units
    joined: list[list[int]] = []
    single: list[int] | None = None
    for unit in units:
        if len(unit) >= 2:
            joined.append(unit)
        elif single is None:
            single = unit
        else:
            joined.append(single + unit)
            single = None
    if single is not None:  # one row left over: it joins the last unit (or stands alone in a 1-row dataset)
        if joined:
            joined[-1] = joined[-1] + single
        else:
            joined.append(single)
    return joined


def make_units(rows: Sequence[dict[str, Any]], *, from_pairs: bool, kl_pairs: bool) -> list[list[dict]] | None:
    """Rows grouped into units (see the module docstring), in row order; None when rows stand alone."""
    units = unit_positions([r["index"] for r in rows], from_pairs=from_pairs, kl_pairs=kl_pairs)
    return None if units is None else [[rows[p] for p in u] for u in units]


class UnitRows(Sequence):
    """The units of ``rows`` as a sequence (each item: the unit's row dicts, built on access)."""

    def __init__(self, rows: Sequence[dict[str, Any]], units: list[list[int]]):
        self.rows, self.units = rows, units

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, u: int) -> list[dict[str, Any]]:  # type: ignore[override]  # no slices
        return [self.rows[p] for p in self.units[u]]


def units_per_batch(batch_size: int) -> int:
    """Units in a batch of about ``batch_size`` rows (an odd size rounds up to whole pairs)."""
    return max(1, -(-batch_size // 2))


@dataclass
class UnitCollator:
    """Flatten a batch of units into rows and collate them with ``collator``."""

    collator: Any

    def __call__(self, units: list[list[dict[str, Any]]]) -> dict[str, Any]:
        return self.collator([r for unit in units for r in unit])
