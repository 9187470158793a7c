"""Length-grouped sampling: a permutation across ranks, reproducible, less padding, exactly resumable."""

from __future__ import annotations

import random
from collections import Counter

import lightning as L
import pytest
import torch
from torch.utils.data import DistributedSampler

from dpo_lightning.data.sampler import LengthGroupedSampler, ResumableDataLoader

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(5, 300) for _ in range(203)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("group", [True, False])
def test_epoch_is_a_permutation_across_ranks(world, group):
    n, bs = len(LENGTHS), 4
    per_rank = [list(LengthGroupedSampler(LENGTHS, bs, num_replicas=world, rank=r, seed=3,
                                          group_by_length=group)) for r in range(world)]
    assert len({len(x) for x in per_rank}) == 1  # equal shares: DDP ranks step together
    counts = Counter(i for x in per_rank for i in x)
    assert set(counts) == set(range(n))  # every row, on exactly one rank ...
    extra = sum(per_rank[0].__len__() for _ in range(world)) - n
    assert extra == (-n) % world and sum(c - 1 for c in counts.values()) == extra  # ... plus the wrap-around


def test_drop_last_and_divisible_sizes_are_exact_permutations():
    lengths = LENGTHS[:200]
    per_rank = [list(LengthGroupedSampler(lengths, 5, num_replicas=4, rank=r, seed=0)) for r in range(4)]
    assert sorted(i for x in per_rank for i in x) == list(range(200))
    dropped = [list(LengthGroupedSampler(LENGTHS, 5, num_replicas=4, rank=r, drop_last=True)) for r in range(4)]
    flat = [i for x in dropped for i in x]
    assert len(flat) == len(set(flat)) == 200


def test_reproducible_by_seed_and_epoch():
    a = LengthGroupedSampler(LENGTHS, 4, seed=7)
    b = LengthGroupedSampler(LENGTHS, 4, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    assert list(LengthGroupedSampler(LENGTHS, 4, seed=8)) != first


def padding(order: list[int], bs: int) -> float:
    waste = total = 0
    for k in range(0, len(order), bs):
        batch = [LENGTHS[i] for i in order[k:k + bs]]
        waste += max(batch) * len(batch) - sum(batch)
        total += max(batch) * len(batch)
    return waste / total


def test_grouping_cuts_padding_and_ranks_of_a_step_see_similar_lengths():
    grouped = list(LengthGroupedSampler(LENGTHS, 4, seed=0))
    shuffled = list(LengthGroupedSampler(LENGTHS, 4, seed=0, group_by_length=False))
    assert padding(grouped, 4) < 0.5 * padding(shuffled, 4)
    r0, r1 = (list(LengthGroupedSampler(LENGTHS, 4, num_replicas=2, rank=r, seed=0)) for r in (0, 1))
    step_gap = [abs(max(LENGTHS[i] for i in r0[k:k + 4]) - max(LENGTHS[i] for i in r1[k:k + 4]))
                for k in range(0, len(r0) - 4, 4)]
    assert sorted(step_gap)[len(step_gap) // 2] < 20


def test_rank_comes_from_torch_distributed_and_lightning_keeps_the_sampler():
    s = LengthGroupedSampler(LENGTHS, 4)
    assert (s.num_replicas, s.rank) == (1, 0)
    # Lightning only swaps in its own DistributedSampler for samplers that are not one
    assert isinstance(s, DistributedSampler)


def test_loader_state_resumes_exactly_mid_epoch():
    def loader():
        s = LengthGroupedSampler(LENGTHS, 4, seed=5)
        return ResumableDataLoader(list(range(len(LENGTHS))), batch_size=4, sampler=s,
                                   collate_fn=lambda rows: rows)

    full = loader()
    full.sampler.set_epoch(2)
    expected = list(full)
    first = loader()
    first.sampler.set_epoch(2)
    it = iter(first)
    seen = [next(it) for _ in range(7)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["consumed"] == 28
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # Lightning calls set_epoch after restoring the loader state
    rest = list(resumed)
    assert seen + rest == expected
    assert len(resumed) == len(full)
    # the skip applies once, to the saved epoch only
    resumed.sampler.set_epoch(3)
    full.sampler.set_epoch(3)
    assert list(resumed) == list(full)


def test_lightning_resume_sees_the_same_batches(tiny_path, default_data_path, tmp_path):
    """A run resumed from a mid-epoch checkpoint trains on exactly the batches of an uninterrupted run."""
    from dpo_lightning import PreferenceDataModule, PreferenceLitModule, get_loss

    class Record(L.Callback):
        def __init__(self):
            self.batches = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches.append(batch["index"].tolist())

    def fit(max_steps, ckpt_path=None, callbacks=()):
        rec = Record()
        module = PreferenceLitModule(str(tiny_path), loss=get_loss("sigmoid", beta=0.1), optimizer={"lr": 1e-3})
        dm = PreferenceDataModule(default_data_path, str(tiny_path), batch_size=8, max_length=32, seed=1)
        trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[rec, *callbacks],
                            enable_checkpointing=bool(callbacks), limit_val_batches=0)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return rec.batches, len(dm.train_dataloader())

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1,
                                               filename="s{step}", auto_insert_metric_name=False)
    steps = 5
    full, per_epoch = fit(steps, callbacks=[ckpt])
    assert 3 < per_epoch  # the checkpoint at step 3 is mid-epoch
    resumed, _ = fit(steps, ckpt_path=str(tmp_path / "s3.ckpt"))
    assert resumed == full[3:steps]
    assert torch.tensor(full[0]).numel() == 8
