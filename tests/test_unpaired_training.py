"""Unpaired losses (KTO/BCO): they train with the default callbacks on natively unpaired data (the best checkpoint
follows val/loss there, reward accuracy where the rows come from pairs), and under DDP: the two rows of a split pair share a rank and a batch, and no rank gets a one-row KTO batch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dpo_lightning import PreferenceDataModule
from dpo_lightning.data import sampler as sampler_mod


def _rank_batches(dm, rank: int, world: int, monkeypatch) -> tuple[list[dict], list[dict]]:
    """The train and validation batches rank ``rank`` of ``world`` sees (validation as Lightning shards it)."""
    monkeypatch.setattr(sampler_mod, "_dist_info", lambda n, r: (world, rank))
    train = list(dm.train_dataloader())
    val = dm.val_dataloader()
    shard = DistributedSampler(val.dataset, num_replicas=world, rank=rank, shuffle=False)
    return train, list(DataLoader(val.dataset, batch_size=val.batch_size, sampler=shard, collate_fn=val.collate_fn))


@pytest.mark.parametrize("eval_batch_size", [2, 3, 5])
def test_split_pairs_share_a_rank_and_batch_and_no_rank_gets_one_row(default_data_path, tiny_path, monkeypatch,
                                                                      eval_batch_size):
    dm = PreferenceDataModule(default_data_path, str(tiny_path), batch_size=4, eval_batch_size=eval_batch_size,
                              max_length=64, paired=False, kl_pairs=True, val_fraction=0.1)
    dm.setup("fit")
    seen: dict[str, set] = {"train": set(), "val": set()}
    for rank in range(2):
        for split, batches in zip(("train", "val"), _rank_batches(dm, rank, 2, monkeypatch)):
            for b in batches:
                assert b["index"].numel() >= 2, f"{split}: a one-row KTO batch on rank {rank}"
                pairs, counts = torch.unique(b["pair"], return_counts=True)
                assert (counts == 2).all(), f"{split}: a pair split across batches or ranks on rank {rank}"
                seen[split] |= set(pairs.tolist())
    assert seen["train"] == {r["index"] // 2 for r in dm.train_rows}  # every pair is trained on
    assert seen["val"] == {r["index"] // 2 for r in dm.val_rows}


TRAIN = ["logger=csv", "print_config=false", "trainer.accelerator=cpu", "trainer.max_steps=4",
         "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "data.batch_size=4",
         "callbacks.progress_bar=null", "callbacks.throughput=null"]


def _train(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpo_lightning.train", *TRAIN, "export=false",
                           f"paths.output_dir={tmp_path}", *overrides], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)


def _val_metrics(out) -> set[str]:
    with open(out / "csv" / "metrics.csv") as fh:
        return {k for row in csv.DictReader(fh) for k, v in row.items() if v and k.startswith("val/")}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.subprocess
def test_kto_trains_under_ddp_on_two_cpu_processes(tmp_path):
    """`dpo-train loss=kto strategy=ddp trainer.devices=2 trainer.accelerator=cpu` on the embedded default."""
    res = _train(tmp_path, "loss=kto", "strategy=ddp", "trainer.devices=2", "eval_before=false")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "val/rewards/accuracies" in _val_metrics(tmp_path)
    assert list((tmp_path / "checkpoints").glob("best-step*.ckpt"))  # selected by reward accuracy


def test_unpaired_losses_on_unpaired_rows_train_with_the_default_callbacks(tmp_path, default_data_path):
    """Natively unpaired rows have no pairs, so no reward accuracy: checkpoints follow val/loss instead."""
    from dpo_lightning.cli.locate import compose
    from dpo_lightning.train import train

    rows = [json.loads(line) for line in open(default_data_path)][:40]
    data = tmp_path / "unpaired.jsonl"
    with open(data, "w") as fh:
        for r in rows:
            for completion, label in ((r["chosen"], True), (r["rejected"], False)):
                fh.write(json.dumps({"prompt": r["prompt"], "completion": completion, "label": label}) + "\n")
    torch.set_num_threads(1)
    train(compose("train", [*TRAIN, "loss=kto", f"data.path={data}", "eval_before=false", "export=false",
                            f"paths.output_dir={tmp_path}"]))
    assert "val/loss" in _val_metrics(tmp_path) and "val/rewards/accuracies" not in _val_metrics(tmp_path)
    ckpt = torch.load(next((tmp_path / "checkpoints").glob("best-step*.ckpt")), weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if "Checkpoint" in k)
    assert state["monitor"] == "val/loss"


def test_the_selection_metric_follows_loss_and_data():
    from dpo_lightning import get_loss
    from dpo_lightning.callbacks import selection_metric

    assert selection_metric(get_loss("sigmoid"), from_pairs=False) == ("val/rewards/accuracies", "max")
    for name in ("kto", "bco", "apo_zero_unpaired"):
        assert selection_metric(get_loss(name), from_pairs=True) == ("val/rewards/accuracies", "max")
        assert selection_metric(get_loss(name), from_pairs=False) == ("val/loss", "min")
    from dpo_lightning.callbacks import PreferenceCheckpoint

    assert PreferenceCheckpoint(monitor="val/loss").mode == "min"  # an explicit metric gets its own direction
    assert PreferenceCheckpoint(monitor="val/rewards/margins").mode == "max"
    assert PreferenceCheckpoint(monitor="val/loss", mode="max").mode == "max"  # as the user says
