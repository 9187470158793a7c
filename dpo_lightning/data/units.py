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

from dataclasses import dataclass
from typing import Any


def make_units(rows: list[dict[str, Any]], *, from_pairs: bool, kl_pairs: bool) -> list[list[dict]] | None:
    """Rows grouped into units (see the module docstring), in row order; None when rows stand alone."""
    if not (from_pairs or kl_pairs):
        return None
    units: list[list[dict]] = []
    for r in rows:  # rows are in index order: a pair's two rows are neighbours when both survived
        if from_pairs and units and units[-1][0]["index"] // 2 == r["index"] // 2:
            units[-1].append(r)
        else:
            units.append([r])
    if not kl_pairs:
        return units
    joined: list[list[dict]] = []
    single: list[dict] | None = None
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


def units_per_batch(batch_size: int) -> int:
    """Units in a batch of about ``batch_size`` rows (an odd size rounds up to whole pairs)."""
    return max(1, -(-batch_size // 2))


@dataclass
class UnitCollator:
    """Flatten a batch of units into rows and collate them with ``collator``."""

    collator: Any

    def __call__(self, units: list[list[dict[str, Any]]]) -> dict[str, Any]:
        return self.collator([r for unit in units for r in unit])
