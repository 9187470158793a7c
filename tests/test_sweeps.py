"""Sweeps: one W&B run per job in one group, failed jobs recorded while the sweep goes on, the report (CSV,
Markdown, plots, pandas), and one reference pass per sweep, sequential and in parallel processes."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpo_lightning.sweeps import load, write_report
from dpo_lightning.sweeps.job import JobInfo, write_summary

FAST = ["trainer.max_steps=3", "trainer.val_check_interval=3", "data.batch_size=8", "data.max_length=48",
        "+trainer.limit_val_batches=2", "eval_before=false", "export=false", "print_config=false"]


def multirun(tmp_path: Path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1")  # no W&B credentials anywhere
    res = subprocess.run([sys.executable, "-m", "dpo_lightning.train", "-m", f"paths.log_dir={tmp_path}/out",
                          f"paths.cache_dir={tmp_path}/cache", *FAST, *args],
                         capture_output=True, text=True, timeout=timeout, env=env)
    sweeps = sorted((tmp_path / "out" / "train" / "multiruns").glob("*"))
    assert sweeps, res.stderr[-4000:]
    return res, sweeps[-1]


def wandb_records(path: Path):
    """The records of an offline W&B run file (LevelDB log format: 32 KiB blocks of CRC/length/type chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST continue it
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def offline_run(folder: Path) -> dict:
    (path,) = folder.glob("wandb/offline-run-*/*.wandb")
    out: dict = {"config": {}}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, group=rec.run.run_group, name=rec.run.display_name,
                       job_type=rec.run.job_type, tags=list(rec.run.tags))
        if kind in ("run", "config"):
            items = rec.run.config.update if kind == "run" else rec.config.update
            out["config"].update({i.key: json.loads(i.value_json) for i in items})
    return out


@pytest.mark.slow
@pytest.mark.subprocess
def test_grid_sweep_four_wandb_runs_one_group_report_and_one_reference_pass(tmp_path):
    """`dpo-train -m loss=sigmoid,ipo loss.beta=0.1,0.5` without W&B credentials."""
    res, sweep = multirun(tmp_path, "loss=sigmoid,ipo", "loss.beta=0.1,0.5")
    assert res.returncode == 0, res.stderr[-4000:]
    runs = {int(p.name): offline_run(p) for p in sweep.iterdir() if p.name.isdigit()}
    assert len(runs) == 4 and len({r["id"] for r in runs.values()}) == 4
    assert {r["group"] for r in runs.values()} == {sweep.name}
    # short W&B run names: the job number and the swept values
    assert {r["name"].split(": ", 1)[1] for r in runs.values()} == {f"{lo} β={b}" for lo in ("sigmoid", "ipo")
                                                                    for b in (0.1, 0.5)}
    for num, r in runs.items():
        assert r["job_type"] == "train" and r["tags"] == [r["config"]["loss.name"]]
        assert r["name"] == f"{num}: {r['config']['loss.name']} β={r['config']['loss.beta']}"
    df = load(sweep)
    assert len(df) == 4 and {"loss", "loss.beta", "val/rewards/accuracies", "wandb_run_id"} <= set(df.columns)
    assert (df["status"] == "ok").all() and df["val/rewards/accuracies"].between(0, 1).all()
    assert set(df["wandb_run_id"]) == {r["id"] for r in runs.values()}
    assert df["reference_passes"].sum() == 1  # one job computed the reference log-probs, three loaded them
    assert (sweep / "sweep_report.csv").read_text().splitlines()[0].startswith("job,name,loss,loss.beta")
    for png in ("sweep_beta.png", "sweep_curves.png"):
        assert (sweep / png).read_bytes()[:4] == b"\x89PNG"
    assert f"wandb sync {sweep}/*/wandb/offline-run-*" in res.stdout
    assert "reference passes: 1 for 4 jobs" in res.stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    res, sweep = multirun(tmp_path, "logger=csv", "loss.label_smoothing=0.0,0.7,0.1")
    assert res.returncode == 1  # the sweep finished, but not every job did
    df = load(sweep).set_index("job")
    assert list(df["status"]) == ["ok", "failed", "ok"]
    assert df.loc[1, "error"] == "ConfigError: loss.label_smoothing=0.7: must lie in [0, 0.5) (loss 'sigmoid')"
    assert df.loc[2, "val/rewards/accuracies"] >= 0
    assert "failed" in (sweep / "sweep_report.md").read_text()
    assert "sweep job 1 (loss.label_smoothing=0.7) failed" in res.stderr


def _fake_sweep(root: Path) -> Path:
    """A sweep folder as jobs leave it (summaries + curves), without running any: report logic alone."""
    specs = [("sigmoid", 0.1, 0.70, 1.0, 0.2), ("sigmoid", 0.5, 0.80, 2.0, 0.9), ("ipo", 0.1, 0.75, 0.5, 0.4),
             ("ipo", 0.5, None, None, None)]
    for i, (loss, beta, acc, margin, kl) in enumerate(specs):
        folder = root / str(i)
        job = JobInfo(sweep=root.name, sweep_dir=str(root), num=i, overrides={"loss": loss, "loss.beta": str(beta)},
                      name=f"loss={loss},loss.beta={beta}")
        if acc is None:  # still running (or interrupted)
            write_summary(folder, job, "running")
            continue
        write_summary(folder, job, "ok", loss_name=loss, beta=beta, steps=10, reference_passes=int(i == 0),
                      metrics={"val/rewards/accuracies": acc, "val/rewards/margins": margin, "val/loss": 0.5,
                               "val/logps/chosen": -9.0, "gen/kl": kl, "gen/reward": acc * 2})
        (folder / "training_curves.csv").write_text("metric,step,value\n" + "".join(
            f"train/loss,{s},{0.7 - 0.03 * s + 0.05 * (s % 2)}\n" for s in range(1, 11)) + f"val/rewards/accuracies,10,{acc}\n")
    return root


def test_report_from_folder_ranks_plots_and_handles_running_jobs(tmp_path):
    sweep = _fake_sweep(tmp_path / "2026-01-01_00-00-00")
    df = write_report(sweep)
    assert list(df["status"]) == ["ok", "ok", "ok", "running/interrupted"]
    assert list(df["loss.beta"]) == [0.1, 0.5, 0.1, 0.5] and "gen/kl" in df.columns
    md = (sweep / "sweep_report.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and "job" not in ln]
    assert [ln.split("|")[1].strip() for ln in table] == ["1", "2", "0", "3"]  # best held-out accuracy first
    assert "reference passes: 1" in md
    for png in ("sweep_beta.png", "sweep_curves.png", "sweep_frontier.png"):
        assert (sweep / png).read_bytes()[:4] == b"\x89PNG"
    # dpo-sweep-report rebuilds it (exit 0: nothing failed), and refuses a folder that is not a sweep
    from dpo_lightning.sweeps.cli import main

    (sweep / "sweep_report.csv").unlink()
    assert main([str(sweep), "--no-plots"]) == 0 and (sweep / "sweep_report.csv").exists()
    assert main([str(tmp_path / "nothing")]) == 2


# ------------------------------------------------------------------ one reference pass, parallel processes
def _parallel_worker(tiny_path: str, cache_dir: str, barrier, results) -> None:
    """One 'sweep job' computing the same reference values as the other, started at the same moment."""
    from helpers import rows_of

    from dpo_lightning.data.collate import PreferenceCollator
    from dpo_lightning.data.datamodule import tokenizer_fingerprint
    from dpo_lightning.models.hf import ModelSpec, load_causal_lm, load_tokenizer
    from dpo_lightning.reference.cache import cached_reference_logps, weights_fingerprint

    torch.set_num_threads(1)
    model, tok = load_causal_lm(ModelSpec(tiny_path)), load_tokenizer(ModelSpec(tiny_path))
    collator = PreferenceCollator(tok.pad_token_id, layout="prefix_shared")

    def slow_collator(rows):  # the real collator, slowed so both processes are inside the pass together
        time.sleep(0.4)
        return collator(rows)

    rows = rows_of(tok)
    barrier.wait()
    _, info = cached_reference_logps(rows, model, slow_collator, weights=weights_fingerprint(model),
                                     tokenizer=tokenizer_fingerprint(tok), truncation={"max_length": 64},
                                     cache_dir=cache_dir, batch_size=2)
    results.put(info["hit"])


@pytest.mark.distributed  # two spawned processes
def test_two_parallel_processes_do_one_reference_pass(tiny_path, tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_parallel_worker, args=(str(tiny_path), str(tmp_path), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    hits = sorted(results.get(timeout=5) for _ in procs)
    assert hits == [False, True]  # one computed; the other waited on the lock and loaded its file
    assert len(list(tmp_path.glob("reference/*.safetensors"))) == 1


# ------------------------------------------------------------------ Optuna search
def test_optuna_search_spaces_parse_from_hydra_grammar():
    pytest.importorskip("optuna")
    import optuna.distributions as d

    from hydra_plugins.dpo_lightning_optuna.optuna_sweeper import DpoOptunaSweeper

    sweeper = DpoOptunaSweeper(params={"loss": "choice(sigmoid, ipo)", "loss.beta": "tag(log, interval(0.01, 1))",
                                       "data.batch_size": "range(4, 17, 4)"})
    space, fixed = sweeper._search_space(["seed=3", "optimizer.lr=interval(1e-4, 1e-3)", "data.batch_size=8"])
    assert fixed == ["seed=3", "data.batch_size=8"]  # a fixed command-line value replaces the config's space
    assert space == {"loss": d.CategoricalDistribution(["sigmoid", "ipo"]),
                     "loss.beta": d.FloatDistribution(0.01, 1.0, log=True),
                     "optimizer.lr": d.FloatDistribution(1e-4, 1e-3)}
    with pytest.raises(ValueError, match="direction"):
        DpoOptunaSweeper(direction="up")


@pytest.mark.slow
@pytest.mark.subprocess
def test_optuna_three_trials_on_the_embedded_default(tmp_path):
    pytest.importorskip("optuna")
    res, sweep = multirun(tmp_path, "hparams_search=optuna_beta", "hydra.sweeper.n_trials=3", "logger=csv")
    assert res.returncode == 0, res.stderr[-4000:]
    df = load(sweep)
    assert len(df) == 3 and (df["status"] == "ok").all()
    assert {"loss", "loss.beta", "optimizer.lr"} <= set(df.columns) and df["loss.beta"].between(0.01, 1).all()
    import yaml

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # the search maximizes the sweep objective (sweep.objective=auto: val/pref_loglik), not reward accuracy
    assert results["n_trials"] == 3 and results["best_value"] == pytest.approx(df["val/pref_loglik"].max())


# ------------------------------------------------------------------ per-job defaults
@pytest.mark.parametrize("overrides,exact", [
    ([], True), (["loss=ipo"], True), (["loss=simpo"], False), (["loss=kto"], False),
    (["trainer.precision=bf16-mixed"], False), (["engine.full_logits=true"], False),
    (["reference.sync.every_n_steps=10"], False),  # TR-DPO: the reference moves
])
def test_multirun_turns_reference_precompute_on_only_where_exact(overrides, exact):
    from dpo_lightning.cli.locate import compose
    from dpo_lightning.sweeps.job import apply_sweep_defaults

    cfg = compose("train", overrides)
    assert cfg.reference.precompute is None  # default: decided per job
    job = JobInfo(sweep="sweep-1", sweep_dir="/tmp/s", num=2, name="loss=ipo,loss.beta=0.5",
                  overrides={"loss": "ipo", "loss.beta": "0.5", "trainer.max_steps": "3"}, swept=["loss", "loss.beta"])
    apply_sweep_defaults(cfg, job)
    assert cfg.reference.precompute is exact
    w = cfg.logger.wandb
    assert (w.group, w.name, list(w.tags)) == ("sweep-1", "2: ipo β=0.5", [cfg.loss.name])
    cfg = compose("train", [*overrides, "reference.precompute=false", "sweep_id=mine", "logger.wandb.name=x"])
    apply_sweep_defaults(cfg, job)
    assert cfg.reference.precompute is False and (cfg.logger.wandb.group, cfg.logger.wandb.name) == ("mine", "x")
