"""DDP on the CPU (gloo, 2 processes) through the real CLI: same losses as one process with the same global batch,
the same number of steps on every rank when the data does not divide, and no hang (subprocess timeouts)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import script_env

TIMEOUT = 240  # seconds per run; a desynchronized DDP run would hang in a collective instead of finishing

pytestmark = [pytest.mark.distributed, pytest.mark.subprocess]

COMMON = [
    "logger=csv", "callbacks=none", "print_config=false", "eval_before=false",
    "trainer.accelerator=cpu", "trainer.log_every_n_steps=1", "trainer.val_check_interval=1000",
    "trainer.gradient_clip_val=null", "scheduler=constant", "scheduler.warmup_ratio=0.0",
    "optimizer.lr=1e-2", "data.path=builtin:default_prefs", "data.val_fraction=0", "data.num_workers=0",
    "trainer.deterministic=true",
]

def _train(out: Path, *overrides: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = script_env(**(env_extra or {}))  # tests/scripts (rank_steps_cb) on PYTHONPATH
    try:
        res = subprocess.run([sys.executable, "-m", "dpo_lightning.train", *COMMON, f"paths.output_dir={out}",
                              *overrides], capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=out.parent)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"training did not finish in {TIMEOUT}s (a DDP hang?):\n{(err.stderr or b'')[-3000:]}")
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _losses(out: Path) -> dict[int, float]:
    with open(out / "csv" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/loss")]
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "export" / "model.safetensors"))


def test_ddp_two_processes_match_one_process(tmp_path):
    """5 steps, global batch 8: DDP 2 x 4 pairs vs. one process with 8 pairs: same losses and same weights."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _train(single, "trainer.devices=1", "data.batch_size=8", "trainer.max_steps=5")
    _train(ddp, "strategy=ddp", "trainer.devices=2", "data.batch_size=4", "trainer.max_steps=5")
    one, two = _losses(single), _losses(ddp)
    assert len(one) == 5 and sorted(one) == sorted(two), (one, two)
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), (step, one, two)
    assert len(set(round(v, 4) for v in one.values())) > 1  # the loss moves: the steps did train
    w1, w2 = _weights(single), _weights(ddp)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=0, msg=k)


def test_ddp_every_rank_takes_the_same_steps_on_uneven_data(tmp_path, default_data_path):
    """13 pairs on 2 ranks with batch 2: the sampler pads to 14, so both ranks take 4 batches, and finish."""
    lines = Path(default_data_path).read_text().splitlines()[:13]
    data = tmp_path / "odd.jsonl"
    data.write_text("\n".join(lines) + "\n")
    steps_dir = tmp_path / "steps"
    out = tmp_path / "run"
    _train(out, "strategy=ddp", "trainer.devices=2", f"data.path={data}", "data.batch_size=2",
           "trainer.max_steps=-1", "trainer.max_epochs=1", "export=false",
           "+callbacks.rank_steps._target_=rank_steps_cb.RankSteps", f"+callbacks.rank_steps.out_dir={steps_dir}")
    ranks = [json.loads((steps_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4, ranks
    assert ranks[0]["batches"] == ranks[1]["batches"] == 4, ranks
