"""Results a researcher can trust: an objective that sees how far a policy moved (val/pref_loglik), standard
errors beside held-out figures, no winner named within noise, grid points that do not compose recorded as failed
jobs, and gen/kl (so the frontier) in a default sweep, whose reference is precomputed."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from dpo_lightning.sweeps import load, write_report
from dpo_lightning.sweeps.report import ranked, verdict
from dpo_lightning.training.heldout import HeldOutRecorder, mean_stderr
from tests.sweep_fixtures import fake_job
from tests.test_sweeps import multirun

LOG_HALF = math.log(0.5)  # log sigmoid(0): a policy that has not moved


# ------------------------------------------------------------------ the objective and the verdict
def test_an_untrained_run_no_longer_ranks_first(tmp_path):
    """The reported case: an IPO trial at lr 1.7e-7 (margins ~3e-5) had the best held-out reward accuracy."""
    fake_job(tmp_path, 0, {"loss": "ipo", "optimizer.lr": "1.7e-07"}, loss="ipo", beta=0.1, lr=1.7e-7,
             objective=LOG_HALF + 1e-6, se=1e-6, acc=0.95)
    fake_job(tmp_path, 1, {"loss": "sigmoid", "optimizer.lr": "0.001"}, loss="sigmoid", beta=0.1, lr=1e-3,
             objective=-0.40, se=0.015, acc=0.92)
    df = load(tmp_path)
    assert list(ranked(df)["job"]) == [1, 0]
    assert verdict(df).startswith("Best: job 1 (sigmoid lr=0.001)")  # what varies, shortly


def test_no_winner_is_named_within_noise(tmp_path):
    """0.917 vs 0.950 held-out accuracy on 120 rows is within 2 combined standard errors."""
    for num, (acc, loss) in enumerate(((0.917, "sigmoid"), (0.950, "ipo"))):
        fake_job(tmp_path, num, {"loss": loss}, loss=loss, beta=0.1, lr=1e-3, objective=-0.5 + 0.01 * num,
                 se=0.02, acc=acc)
    df = load(tmp_path)
    text = verdict(df)
    assert text.startswith("No clear winner: job 1 (ipo) and job 0 (sigmoid) within noise"), text
    write_report(tmp_path, plots=False)
    md = (tmp_path / "sweep_report.md").read_text()
    assert "No clear winner" in md and "0.95 ± 0.02" in md and "-0.49 ± 0.02" in md  # value ± standard error
    csv_header = (tmp_path / "sweep_report.csv").read_text().splitlines()[0].split(",")
    assert {"val/pref_loglik_se", "val/rewards/accuracies_se", "val/loss_se", "objective"} <= set(csv_header)


def test_recorder_baseline_stderr_and_a_reference_free_loss(tiny_path, default_data_path, tmp_path):
    """Untrained: exactly log sigmoid(0) for a referenced and a reference-free loss; moved: a different value,
    standard errors, one value per held-out row."""
    from dpo_lightning import PreferenceDataModule, PreferenceLitModule

    torch.set_num_threads(1)
    L.seed_everything(0)
    for loss in ("sigmoid", "simpo"):
        dm = PreferenceDataModule(default_data_path, tokenizer=str(tiny_path), val_fraction=0.05, batch_size=8,
                                  max_length=48, cache_dir=str(tmp_path / "cache"))
        module = PreferenceLitModule(str(tiny_path), loss=loss)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False)
        before = trainer.validate(module, datamodule=dm, verbose=False)[0]
        assert before["val/pref_loglik"] == pytest.approx(LOG_HALF, abs=1e-6), loss
        n = len(dm.val_rows)
        assert module.heldout.summary()["val/pref_loglik"]["n"] == n
        with torch.no_grad():
            for p in module.policy.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        module._policy_trained = True  # as after training: the baseline stays the untrained validation's
        after = trainer.validate(module, datamodule=dm, verbose=False)[0]
        stats = module.heldout.summary()
        assert after["val/pref_loglik"] != pytest.approx(LOG_HALF, abs=1e-4)
        assert stats["val/pref_loglik"]["stderr"] > 0 and stats["val/rewards/accuracies"]["n"] == n
        values = module.heldout.values()["val/pref_loglik"]
        assert (stats["val/pref_loglik"]["mean"], stats["val/pref_loglik"]["stderr"]) == pytest.approx(
            mean_stderr(values))


def test_without_a_pre_training_validation_the_initial_reference_is_the_baseline():
    rec = HeldOutRecorder()
    rec.start()
    rec.observe(torch.tensor([0, 1]), policy=torch.tensor([[-5.0, -9.0], [-7.0, -6.0]]),
                reference=torch.tensor([[-6.0, -8.0], [-7.0, -6.0]]), losses=None,
                margins=torch.tensor([0.2, -0.1]))
    rec.finish(untrained=False, reference_is_initial=True)
    vals = rec.values()["val/pref_loglik"]
    assert vals == pytest.approx([math.log(1 / (1 + math.exp(-0.1 * 2.0))), LOG_HALF])
    rec.start()
    rec.observe(torch.tensor([0]), policy=torch.tensor([[-5.0, -9.0]]), reference=torch.tensor([[-6.0, -8.0]]),
                losses=None, margins=None)
    rec.finish(untrained=False, reference_is_initial=False)  # another model as reference: no baseline
    assert "val/pref_loglik" not in rec.values()


def test_sweep_objective_config_choice():
    from dpo_lightning.cli.locate import compose
    from dpo_lightning.sweeps.job import resolve_objective

    assert resolve_objective(compose("train", [])) == "val/pref_loglik"
    assert resolve_objective(compose("train", ["generation.judge=my.judges:f"])) == "gen/win_rate"
    assert resolve_objective(compose("train", ["sweep.objective=val/rewards/accuracies"])) == \
        "val/rewards/accuracies"
    with pytest.raises(ValueError, match="sweep.objective"):
        resolve_objective(compose("train", ["sweep.objective=val/loss"]))


# ------------------------------------------------------------------ grid points that do not compose
def test_compose_error_names_the_loss_and_the_key():
    from dpo_lightning.cli.locate import compose
    from dpo_lightning.sweeps.compose import compose_error

    overrides = ["loss=simper", "loss.beta=0.1"]
    with pytest.raises(Exception) as info:
        compose("train", overrides)
    cfg = compose("train", [], return_hydra_config=True)
    assert compose_error(info.value, overrides, cfg).startswith(
        "loss=simper has no key 'beta' (loss.beta=0.1 does not compose: Key 'beta' is not in struct")


@pytest.mark.slow
@pytest.mark.subprocess
def test_default_sweep_records_uncomposable_jobs_logs_gen_kl_and_draws_the_frontier(tmp_path):
    """`dpo-train -m loss=sigmoid,simper loss.beta=0.1`: simper has no beta (a failed job naming it), sigmoid
    runs with a precomputed reference and generation evaluation scores against the reference anyway."""
    res, sweep = multirun(tmp_path, "logger=none", "loss=sigmoid,simper", "loss.beta=0.1",
                          "generation.num_prompts=2", "generation.max_new_tokens=6")
    assert res.returncode == 1, res.stderr[-3000:]  # the sweep finished, not every job did
    df = load(sweep).set_index("job")
    assert list(df["status"]) == ["ok", "failed"]
    assert df.loc[1, "error"].startswith("loss=simper has no key 'beta'")
    assert "sweep job 1 (loss=simper) not run: loss=simper has no key 'beta'" in res.stderr
    summary = json.loads((sweep / "0" / "job_summary.json").read_text())
    assert summary["reference_passes"] == 1  # the precompute ran: the reference was not live in training
    # scored against the reference: a sampled estimate (2 prompts), unbiased but not always >= 0
    assert math.isfinite(summary["metrics"]["gen/kl"]) and "no reference model" not in res.stderr + res.stdout
    assert summary["objective"]["name"] == "val/pref_loglik" and summary["objective"]["stderr"] >= 0
    assert len(summary["heldout_rows"]["val/pref_loglik"]) == summary["objective"]["n"] > 0
    assert (sweep / "sweep_frontier.png").read_bytes()[:4] == b"\x89PNG"
    md = (sweep / "sweep_report.md").read_text()
    assert "±" in md and "sweep_frontier.png" in md and "One finished job: job 0" in md
