"""ThroughputMonitor: Lightning's callback fed with preference batches, exact counts across ranks, FLOPs and MFU."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import script_env
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor
from lightning.pytorch.loggers import CSVLogger

from dpo_lightning import PreferenceDataModule, PreferenceLitModule, get_loss
from dpo_lightning.callbacks import ThroughputMonitor
from dpo_lightning.callbacks.throughput import matmul_params, nonpad_tokens, pairs_in_batch


class Counts(L.Callback):
    def __init__(self):
        self.pairs = self.tokens = self.positions = 0
        self.last_tokens = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.pairs += int(batch["index"].numel())
        self.last_tokens = int(batch["attention_mask"].sum())
        self.flops = pl_module.flops_per_batch  # set by the monitor, which runs first
        self.tokens += self.last_tokens
        self.positions += batch["input_ids"].numel()


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_is_lightnings_monitor_and_its_functions_fit_lightnings(tiny_path):
    from transformers import AutoModelForCausalLM

    assert issubclass(ThroughputMonitor, LightningThroughputMonitor)
    batch = {"index": torch.arange(3), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]),
             "input_ids": torch.zeros(2, 3, dtype=torch.long)}
    assert pairs_in_batch(batch) == 3 and nonpad_tokens(batch) == 3
    LightningThroughputMonitor(batch_size_fn=pairs_in_batch, length_fn=nonpad_tokens)  # usable directly
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    emb = model.get_input_embeddings().weight.numel()
    assert matmul_params(model) == sum(p.numel() for p in model.parameters()) - emb


def test_logs_figures_flops_and_summary(tmp_path, tiny_path, default_data_path):
    torch.set_num_threads(1)
    module = PreferenceLitModule(str(tiny_path), loss=get_loss("sigmoid", beta=0.1), optimizer={"lr": 1e-3})
    dm = PreferenceDataModule(default_data_path, str(tiny_path), batch_size=4, max_length=48, val_fraction=0.05,
                              cache_dir=str(tmp_path / "cache"))
    monitor, counts = ThroughputMonitor(window=3, peak_flops=1e9), Counts()
    trainer = L.Trainer(max_steps=6, logger=CSVLogger(tmp_path), callbacks=[monitor, counts], log_every_n_steps=1,
                        val_check_interval=3, limit_val_batches=2, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    rows = _rows(Path(trainer.logger.log_dir) / "metrics.csv")
    train = [r for r in rows if r.get("train/samples")]
    assert len(train) == 6
    last = train[-1]
    assert float(last["train/samples"]) == counts.pairs and float(last["train/lengths"]) == counts.tokens
    for key in ("train/tokens_per_sec", "train/pairs_per_sec", "train/device/samples_per_sec",
                "train/device/items_per_sec", "train/device/flops_per_sec", "train/device/mfu"):
        assert float(last[key]) > 0, key
    assert "train/tokens_per_sec" not in train[0] or not train[0]["train/tokens_per_sec"]  # one step: no rate
    assert float(train[1]["train/tokens_per_sec"]) > 0
    assert 0 <= float(last["train/padding_fraction"]) < 1
    assert float(last["train/device/mfu"]) == pytest.approx(float(last["train/device/flops_per_sec"]) / 1e9)
    # ratios are the window's: tokens/s over pairs/s = tokens per pair of the last 3 steps' last 2 intervals
    assert float(last["train/tokens_per_sec"]) / float(last["train/pairs_per_sec"]) > 1
    assert any(r.get("validate/samples") for r in rows)  # Lightning's validation throughput too
    # 6N per processed token (policy forward + backward) + 2N (the live reference's forward)
    n = matmul_params(module.policy)
    assert counts.flops == 8 * n * counts.last_tokens
    s = monitor.summary
    assert s["tokens_per_sec"] * s["train_seconds"] == pytest.approx(counts.tokens)
    assert s["pairs_per_sec"] * s["train_seconds"] == pytest.approx(counts.pairs)
    assert s["padding_fraction"] == pytest.approx(1 - counts.tokens / counts.positions)
    assert s["mfu"] == pytest.approx(8 * n * counts.tokens / s["train_seconds"] / 1e9)


@pytest.mark.slow  # two processes on a 2-core machine: ~30 s idle
@pytest.mark.distributed
@pytest.mark.subprocess
def test_ddp_two_processes_sum_the_ranks(tmp_path):
    """gloo, 2 processes, the CLI: the logged totals are both ranks' pairs and tokens."""
    out = tmp_path / "run"
    env = script_env(OMP_NUM_THREADS="1")  # tests/scripts (rank_counts_cb) on PYTHONPATH
    cmd = [sys.executable, "-m", "dpo_lightning.train", "logger=csv", "callbacks=none", "print_config=false",
           "eval_before=false", "trainer.accelerator=cpu", "strategy=ddp", "trainer.devices=2",
           "trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.val_check_interval=1000",
           "data.val_fraction=0", "data.batch_size=4", "data.max_length=48", "export=false", f"paths.output_dir={out}",
           "+callbacks.throughput._target_=dpo_lightning.callbacks.ThroughputMonitor",
           "+callbacks.counts._target_=rank_counts_cb.RankCounts", f"+callbacks.counts.out_dir={out}/ranks"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    last = [r for r in _rows(out / "csv" / "metrics.csv") if r.get("train/samples")][-1]
    world = 2  # Lightning's counters are per device: the ranks' sum / world size
    assert float(last["train/samples"]) * world == sum(r["pairs"] for r in ranks) == 3 * 4 * world
    assert float(last["train/lengths"]) * world == sum(r["tokens"] for r in ranks)
    assert float(last["train/tokens_per_sec"]) > 0 and float(last["train/pairs_per_sec"]) > 0
    assert "training throughput:" in res.stdout
