"""TR-DPO and generation evaluation on 2 CPU processes (gloo). DDP, through the real CLI: after every sync
each rank's reference log-probs equal those of a model built from the mixed weights, both ranks hold the same
reference, and the prompts split across ranks come back gathered into one file per validation. FSDP: the
sync mixes shards in place and training matches one process."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from helpers import SCRIPTS, script_env

TIMEOUT = 300

pytestmark = [pytest.mark.distributed, pytest.mark.subprocess]

@pytest.mark.slow
def test_ddp_sync_is_exact_on_every_rank_and_generation_is_gathered(tmp_path):
    out, checks = tmp_path / "run", tmp_path / "checks"
    args = ["logger=csv", "print_config=false", "eval_before=true", "trainer.accelerator=cpu", "strategy=ddp",
            "trainer.devices=2", "data.batch_size=4", "trainer.max_steps=6", "trainer.val_check_interval=3",
            "optimizer.lr=1e-2", "export=false", "callbacks=none", "reference.sync.every_n_steps=2",
            "reference.sync.alpha=0.6", "data.max_length=32", "+callbacks.sync_check._target_=sync_check_cb.SyncCheck",
            f"+callbacks.sync_check.out_dir={checks}", "+callbacks.sync_check.alpha=0.6",
            "+callbacks.sync_check.every=2", "+callbacks.generation._target_=dpo_lightning.callbacks.GenerationEvaluation",
            "+callbacks.generation.settings.num_prompts=5", "+callbacks.generation.settings.num_samples=2",
            "+callbacks.generation.settings.max_new_tokens=6", f"+callbacks.generation.dirpath={out}/generations",
            f"paths.output_dir={out}"]
    env = script_env(OMP_NUM_THREADS="1")  # sync_check_cb (tests/scripts) importable by the training processes
    try:
        res = subprocess.run([sys.executable, "-m", "dpo_lightning.train", *args], capture_output=True, text=True,
                             timeout=TIMEOUT, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"DDP run did not finish in {TIMEOUT}s (a hang?):\n{(err.stderr or b'')[-3000:]}")
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((checks / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["world_size"] == 2 and r["version"] == 3 and len(r["diffs"]) == 3, r  # syncs at steps 2, 4, 6
        assert max(r["diffs"]) < 1e-5, r
    assert ranks[0]["reference"] == ranks[1]["reference"]  # every rank mixed the same replica
    files = sorted(p.name for p in (out / "generations").glob("step_*.jsonl"))
    assert files == ["step_0.jsonl", "step_3.jsonl", "step_6.jsonl"], files
    rows = [json.loads(x) for x in (out / "generations" / "step_6.jsonl").read_text().splitlines()]
    assert sorted((r["prompt_index"], r["sample"]) for r in rows) == [(i, s) for i in range(5) for s in range(2)]
    first = [json.loads(x) for x in (out / "generations" / "step_0.jsonl").read_text().splitlines()]
    assert all(r["kl"] == 0.0 for r in first)  # before training the policy is the reference
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "gen/kl" in header and "gen/kl_stderr" in header



def _sharded(script, out, *overrides):
    common = ["logger=csv", "print_config=false", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1",
              "trainer.gradient_clip_val=null", "scheduler=constant", "scheduler.warmup_ratio=0.0",
              "optimizer.lr=1e-2", "data.val_fraction=0.02", "trainer.deterministic=true", "callbacks=none",
              "trainer.val_check_interval=1000", "trainer.max_steps=4", "reference.sync.every_n_steps=2",
              "reference.sync.alpha=0.5", "data.max_length=32", f"paths.output_dir={out}"]
    try:
        res = subprocess.run([sys.executable, str(script), *common, *overrides], capture_output=True, text=True,
                             timeout=TIMEOUT, cwd=out.parent, env=script_env(OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"sharded run did not finish in {TIMEOUT}s (a hang?):\n{(err.stderr or b'')[-3000:]}")
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    with open(out / "csv" / "metrics.csv") as fh:
        losses = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")}
    return json.loads(line[len("RESULT "):]), losses


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync")
    script = SCRIPTS / "run_sharded.py"  # build + fit + validate + export of a sharded run, test only
    return script, *_sharded(script, root / "one", "trainer.devices=1", "data.batch_size=8")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2"])
def test_sharded_sync_mixes_shards_in_place_like_one_process(one_process, strategy, tmp_path):
    """FSDP / FSDP2 on 2 CPU processes with TR-DPO every 2 steps (and generation evaluation): the same losses
    after each sync and the same held-out loss as one process with the same global batch."""
    script, one, l1 = one_process
    gen = ["+callbacks.generation._target_=dpo_lightning.callbacks.GenerationEvaluation",
           "+callbacks.generation.settings.num_prompts=3", "+callbacks.generation.settings.max_new_tokens=5",
           f"+callbacks.generation.dirpath={tmp_path}/generations"]
    two, l2 = _sharded(script, tmp_path / "run", f"strategy={strategy}", "trainer.devices=2", "data.batch_size=4",
                       *gen)
    assert one["version"] == two["version"] == 2
    assert sorted(l1) == sorted(l2) and len(l1) == 4
    for step in l1:  # steps 3-4 are scored against the reference moved at step 2
        assert l2[step] == pytest.approx(l1[step], abs=1e-4), (l1, l2)
    assert two["val"] == pytest.approx(one["val"], abs=1e-4)
    rows = (tmp_path / "generations" / "step_4.jsonl").read_text().splitlines()
    assert len(rows) == 6
