"""Non-finite guard: a NaN loss/gradient skips the optimizer step on every rank (weights and optimizer untouched),
is counted as train/skipped_steps and logged with the rows, with gradient accumulation; K skips in a row stop
the run. NaNs are injected into the real policy forward (a hook on the input embeddings), not mocked."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from helpers import load_script, script_env

from dpo_lightning import PreferenceDataModule, PreferenceLitModule, get_loss
from dpo_lightning.training.nonfinite import NonFiniteError, NonFiniteGuard


@pytest.fixture()
def inject_cls():
    """tests/scripts/inject_nan_cb.py's InjectNaN: poisons the policy's forward on chosen (rank, micro-batch) pairs
    and records, per micro-batch, the step, the skip count and a checksum of the policy weights."""
    return load_script("inject_nan_cb.py").InjectNaN


def _fit(tiny_path, data_path, callback, *, accumulate=2, max_steps=4, max_consecutive=3):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    module = PreferenceLitModule(str(tiny_path), loss=get_loss("sigmoid", beta=0.1), optimizer={"lr": 1e-2},
                                 nonfinite={"max_consecutive": max_consecutive},
                                 verify=False)  # the engine's probe forward would meet the injected NaN too
    dm = PreferenceDataModule(data_path, str(tiny_path), batch_size=4, max_length=32, seed=1)
    metrics = []

    class Logged(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics.append(float(trainer.callback_metrics["train/skipped_steps"]))

    trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback, Logged()], limit_val_batches=0, gradient_clip_val=1.0)
    trainer.fit(module, datamodule=dm)
    return module, trainer, metrics


def test_nan_in_one_micro_batch_skips_the_whole_step(tiny_path, default_data_path, inject_cls, caplog):
    """4 steps x 2 micro-batches; micro-batch 3 (step 1's second) is NaN: step 1 leaves the weights exactly as
    they were and the optimizer state untouched; steps 0, 2, 3 train; skipped_steps counts 1; rows are logged."""
    cb = inject_cls("0:3")
    with caplog.at_level("WARNING", logger="dpo_lightning"):
        module, trainer, logged = _fit(tiny_path, default_data_path, cb)
    rec = cb.records
    assert trainer.global_step == 4 and [r["step"] for r in rec] == [0, 1, 1, 2, 2, 3, 3, 4]
    assert rec[3]["after"] == rec[2]["before"]  # the skipped step (micro-batches 2 and 3) changed nothing
    assert all(r["after"] != r["before"] for r in (rec[1], rec[5], rec[7]))  # the other steps trained
    assert module.nonfinite.skipped == 1 and module.nonfinite.consecutive == 0
    assert logged[-1] == 1.0 and logged[0] == 0.0  # train/skipped_steps
    assert module.nonfinite.last_rows == sorted(rec[3]["rows"])  # the NaN micro-batch's rows, not its partner's
    assert f"rows {sorted(rec[3]['rows'])}" in caplog.text and "non-finite loss at step 1" in caplog.text
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    steps = [s["step"] for s in trainer.optimizers[0].state.values()]
    assert all(int(s) == 3 for s in steps)  # AdamW stepped 3 times, not 4


def test_k_skips_in_a_row_stop_the_run(tiny_path, default_data_path, inject_cls):
    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row .* nonfinite.max_consecutive=2"):
        _fit(tiny_path, default_data_path, inject_cls("0:-1"), accumulate=1, max_consecutive=2)


def test_guard_settings_are_checked():
    with pytest.raises(ValueError, match="nonfinite.max_consecutive=0: must be at least 1"):
        NonFiniteGuard(0)
    guard = NonFiniteGuard(3)
    w = torch.nn.Parameter(torch.ones(2))
    w.grad = torch.tensor([1.0, float("inf")])
    guard.observe(torch.tensor(0.5), torch.tensor([7, 9]))
    assert guard.should_skip([w], step=0) and guard.last_rows == [7, 9]  # gradient-only: every row of the step
    w.grad = torch.ones(2)
    guard.observe(torch.tensor(0.5), torch.tensor([1]))
    assert not guard.should_skip([w], step=1) and guard.consecutive == 0 and guard.skipped == 1


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.subprocess
def test_ddp_nan_on_one_rank_skips_on_both_and_stops_after_k(tmp_path):
    """2 CPU processes, accumulation 2. Rank 1 alone gets a NaN in micro-batch 1 (step 0), then in every micro-batch
    from 4 on (steps 2, 3): step 0 is skipped on both ranks, step 1 trains, steps 2 and 3 are skipped and the run
    stops (max_consecutive=2) with a message and a non-zero exit on both ranks, without hanging."""
    out, rec_dir = tmp_path / "run", tmp_path / "rec"
    at = ",".join(["1:1", *(f"1:{b}" for b in range(4, 12))])
    args = ["logger=csv", "callbacks=none", "print_config=false", "eval_before=false", "export=false",
            "trainer.accelerator=cpu", "strategy=ddp", "trainer.devices=2", "trainer.accumulate_grad_batches=2",
            "trainer.max_steps=6", "trainer.val_check_interval=1000", "data.val_fraction=0", "data.batch_size=2",
            "data.max_length=32", "nonfinite.max_consecutive=2", "engine.verify=false", f"paths.output_dir={out}",
            "+callbacks.inject._target_=inject_nan_cb.InjectNaN", f"+callbacks.inject.at='{at}'",
            f"+callbacks.inject.out_dir={rec_dir}"]
    env = script_env(OMP_NUM_THREADS="1")  # tests/scripts (inject_nan_cb) on PYTHONPATH
    try:
        res = subprocess.run([sys.executable, "-m", "dpo_lightning.train", *args], capture_output=True, text=True,
                             timeout=240, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("DDP run with a NaN on one rank hung")
    assert res.returncode != 0
    assert "2 optimizer steps in a row had a non-finite loss or gradient" in res.stderr
    assert "[rank 1] non-finite loss at step 0" in res.stderr + res.stdout
    ranks = [json.loads((rec_dir / f"rank{r}.json").read_text()) for r in range(2)]
    r0, r1 = ranks
    assert [x["step"] for x in r0] == [x["step"] for x in r1] == [0, 1, 1, 2, 2, 3, 3]  # stopped in step 3
    assert r0[1]["after"] == r0[0]["before"] and r1[1]["after"] == r1[0]["before"]  # step 0 skipped, both ranks
    assert r0[3]["after"] != r0[2]["before"]  # step 1 trained
    assert [x["skipped"] for x in r0] == [x["skipped"] for x in r1] == [0, 1, 1, 1, 1, 2, 2]
    assert all(a["after"] == b["after"] for a, b in zip(r0, r1))  # the ranks stayed in sync
