"""Seeded, epoch-aware, rank-aware and resumable sampling that groups rows of similar length.

``LengthGroupedSampler`` yields this rank's indices so that every ``batch_size`` consecutive indices form a
batch of similar lengths (less padding), like Hugging Face's ``LengthGroupedSampler``:

1. a permutation of the data, seeded by ``seed + epoch`` (the same on every rank), padded by wrapping
   around to a multiple of ``world_size`` like ``DistributedSampler`` (or trimmed with ``drop_last``);
2. cut into mega-batches of ``mega_batch_mult * batch_size * world_size`` rows, each sorted by length;
3. each mega-batch cut into global batches of ``batch_size * world_size`` rows; rank r takes the r-th
   contiguous slice of every global batch, so the ranks of one step also see similar lengths (DDP waits
   for the slowest);
4. the order of the global batches is shuffled with the same generator.

Over all ranks, one epoch is a permutation of the data (plus the wrap-around padding). With
``group_by_length=False`` step 2-4 are skipped: a plain seeded permutation, rank r taking its slices.

It subclasses ``DistributedSampler``, so Lightning keeps it under DDP (it only swaps in its own
``DistributedSampler`` for samplers that are not one): ``use_distributed_sampler`` needs no change.
``set_epoch`` (called by Lightning every epoch) reshuffles.

Exact resume: ``ResumableDataLoader`` counts the batches it hands out; its ``state_dict`` (saved by
Lightning in every checkpoint, ``fit_loop.state_dict()["combined_loader"]``) holds the epoch and that count,
and ``load_state_dict`` makes the next epoch-matching iteration skip the consumed indices, so a run resumed
mid-epoch sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler


def _dist_info(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None or rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            num_replicas = torch.distributed.get_world_size() if num_replicas is None else num_replicas
            rank = torch.distributed.get_rank() if rank is None else rank
        else:
            num_replicas, rank = num_replicas or 1, rank or 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
    return num_replicas, rank


class LengthGroupedSampler(DistributedSampler):
    """See the module docstring. ``lengths[i]`` is the cost of row i (e.g. its token count)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, drop_last: bool = False, group_by_length: bool = True,
                 mega_batch_mult: int = 50, shuffle: bool = True):
        num_replicas, rank = _dist_info(num_replicas, rank)
        self.lengths = [int(x) for x in lengths]
        n = len(self.lengths)
        # DistributedSampler's bookkeeping (num_samples, total_size, epoch, seed) without needing a dataset
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,  # type: ignore[arg-type]
                         drop_last=drop_last)  # (range(n): only its len() is read)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.batch_size = batch_size
        self.group_by_length = group_by_length
        self.mega_batch_mult = max(int(mega_batch_mult), 1)
        self._skip: tuple[int, int] | None = None  # (epoch, indices to skip) after load_state_dict

    def global_order(self) -> list[list[int]]:
        """This epoch's global batches (each ``batch_size * num_replicas`` rows, the last maybe fewer)."""
        n, world = len(self.lengths), self.num_replicas
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if self.drop_last:
            order = order[: self.total_size]
        else:  # wrap around to a multiple of the world size, as DistributedSampler does
            extra = self.total_size - n
            order += (order * math.ceil(extra / max(n, 1)))[:extra]
        step = self.batch_size * world
        if not self.group_by_length:
            return [order[i:i + step] for i in range(0, len(order), step)]
        mega = step * self.mega_batch_mult
        batches: list[list[int]] = []
        for i in range(0, len(order), mega):
            chunk = sorted(order[i:i + mega], key=lambda j: -self.lengths[j])
            batches += [chunk[k:k + step] for k in range(0, len(chunk), step)]
        if self.shuffle and len(batches) > 1:
            last = batches.pop() if len(batches[-1]) < step else None  # a short batch stays last
            batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
            if last is not None:
                batches.append(last)
        return batches

    def rank_indices(self) -> list[int]:
        out: list[int] = []
        world, r = self.num_replicas, self.rank
        for b in self.global_order():
            per = len(b) // world  # every global batch holds a multiple of world (total_size is)
            out += b[r * per:(r + 1) * per]
        return out

    def __iter__(self) -> Iterator[int]:
        # a generator: the order is computed at the first next(), after Lightning's set_epoch
        indices = self.rank_indices()
        if self._skip is not None:
            epoch, skip = self._skip
            self._skip = None
            if epoch == self.epoch:
                indices = indices[skip:]
        yield from indices

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self, consumed: int = 0) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "consumed": int(consumed),
                "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_replicas", self.num_replicas) != self.num_replicas:
            raise ValueError(f"cannot resume the data order of a {state['num_replicas']}-rank run on "
                             f"{self.num_replicas} ranks exactly")
        self.seed = int(state.get("seed", self.seed))
        self.set_epoch(int(state["epoch"]))
        self._skip = (int(state["epoch"]), int(state.get("consumed", 0)))


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position within the epoch is saved and restored (Lightning's ``_Stateful``
    protocol: ``state_dict`` / ``load_state_dict`` on the loader), for ``LengthGroupedSampler``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._epoch = 0
        self.accumulate = 1  # micro-batches per optimizer step (set by the module; ``accumulation.py``)

    def __iter__(self):
        # a generator too: runs at the first next(), after Lightning's set_epoch and load_state_dict
        sampler = self.sampler
        self._epoch = getattr(sampler, "epoch", 0)
        pending = getattr(sampler, "_skip", None)  # the sampler drops these indices; count them as handed out
        self._yielded = pending[1] // max(self.batch_size or 1, 1) if pending and pending[0] == self._epoch else 0
        batches: Iterator[dict[str, Any]] = super().__iter__()
        if self.accumulate > 1:
            from dpo_lightning.data.accumulation import with_step_tokens

            batches = with_step_tokens(batches, self.accumulate)
        for batch in batches:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler: Any = self.sampler  # a LengthGroupedSampler when it has load_state_dict
        if not hasattr(sampler, "load_state_dict"):
            return {}
        state = sampler.state_dict(consumed=self._yielded * (self.batch_size or 1))
        state["epoch"] = self._epoch
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state)
