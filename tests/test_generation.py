"""Generation evaluation: left-padded sampling, gen/kl scored by the exact engine, metrics, the callback in a
real fit (JSONL per step, metrics in every logger, a W&B table per step), dpo-eval's generations."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpo_lightning import GenerationSettings, PreferenceLitModule
from dpo_lightning.evaluation.generation import (
    generate_and_score,
    held_out_prompts,
    sample_completions,
    score_completions,
    summarize,
)


@pytest.fixture(scope="module")
def module(tiny_path):
    torch.set_num_threads(1)
    return PreferenceLitModule(str(tiny_path))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["user : good morning . assistant :", "user : describe the school . assistant :",
             "user : how do i clean a room ? assistant :", "user : hi assistant :"]
    return [(i, tokenizer(t)["input_ids"]) for i, t in enumerate(texts)]


def test_left_padded_batch_generates_as_each_prompt_alone(module, prompts, tokenizer):
    """Greedy decoding of prompts of different lengths in one left-padded batch = one prompt at a time."""
    settings = GenerationSettings(num_samples=1, max_new_tokens=6, temperature=0.0, batch_size=8)
    ids = [p for _, p in prompts]
    assert len({len(p) for p in ids}) > 1
    kw = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, seed=0)
    batched = sample_completions(module.policy, ids, settings, **kw)
    alone = [sample_completions(module.policy, [p], settings, **kw)[0] for p in ids]
    assert batched == alone and all(1 <= len(c) <= 6 for c in batched)


def test_sampling_is_seeded_and_leaves_the_training_rng_alone(module, prompts, tokenizer):
    settings = GenerationSettings(num_samples=2, max_new_tokens=5)
    kw = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    state = torch.get_rng_state()
    a = sample_completions(module.policy, [p for _, p in prompts], settings, seed=3, **kw)
    assert torch.equal(state, torch.get_rng_state())
    assert a == sample_completions(module.policy, [p for _, p in prompts], settings, seed=3, **kw)
    assert a != sample_completions(module.policy, [p for _, p in prompts], settings, seed=4, **kw)


def test_scores_are_the_plain_full_softmax_log_probs(module, prompts, tokenizer):
    """The engine's sequence log-probs of samples = log_softmax of the model's own logits, summed."""
    ids = [p for _, p in prompts]
    comps = sample_completions(module.policy, ids, GenerationSettings(num_samples=1, max_new_tokens=5),
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, seed=0)
    got = score_completions(module.policy, ids, comps, pad_token_id=tokenizer.pad_token_id, batch_size=3)
    for i, (p, c) in enumerate(zip(ids, comps)):
        with torch.no_grad():
            logits = module.policy(input_ids=torch.tensor([p + c])).logits[0].float()
        lp = logits.log_softmax(-1)[len(p) - 1:-1].gather(1, torch.tensor(c)[:, None]).sum()
        torch.testing.assert_close(got[i], lp, atol=1e-4, rtol=0)


def test_kl_is_zero_before_training_and_positive_once_the_policy_moves(tiny_path, prompts, tokenizer):
    torch.manual_seed(0)
    m = PreferenceLitModule(str(tiny_path))
    settings = GenerationSettings(num_samples=4, max_new_tokens=12)
    records, refs = generate_and_score(m, tokenizer, prompts, settings, seed=0)
    assert len(records) == 16 and sorted(refs) == [0, 1, 2, 3] and all(len(v) == 4 for v in refs.values())
    assert all(r["kl"] == 0.0 for r in records)  # same weights, same engine: exactly 0
    before = summarize(records)
    assert before["gen/kl"] == 0.0 and before["gen/kl_stderr"] == 0.0
    with torch.no_grad():  # a large move of the policy (the reference stays)
        for p in m.policy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    records, refs2 = generate_and_score(m, tokenizer, prompts, settings, seed=0, reference_samples=refs)
    assert refs2 == refs  # the reference's samples are reused, not drawn again
    after = summarize(records)
    assert after["gen/kl"] > 3 * after["gen/kl_stderr"] > 0
    r = records[0]
    assert r["kl"] == pytest.approx(r["policy_logp"] - r["reference_logp"])
    assert after["gen/entropy"] == pytest.approx(-sum(x["policy_logp"] for x in records) / 16)


def test_summarize_means_stderrs_and_judge_metrics():
    recs = [{"length": n, "eos": e, "policy_logp": -lp, "kl": kl, "judge": j, "reward": rw}
            for n, e, lp, kl, j, rw in [(4, True, 2.0, 1.0, 1.0, 0.5), (6, False, 4.0, 3.0, 0.0, 1.5)]]
    s = summarize(recs)
    assert s["gen/length"] == 5 and s["gen/eos_rate"] == 0.5 and s["gen/entropy"] == 3.0
    assert s["gen/kl"] == 2.0 and s["gen/kl_stderr"] == pytest.approx(math.sqrt(2.0 / 2))
    assert s["gen/win_rate"] == 0.5 and s["gen/win_rate_stderr"] == pytest.approx(0.5) and s["gen/reward"] == 1.0


def test_settings_are_checked_and_prompts_deduplicated():
    with pytest.raises(ValueError, match=r"generation.top_p=0: must be in \(0, 1\]"):
        GenerationSettings(top_p=0)
    rows = [{"index": 2, "prompt_ids": [5, 6]}, {"index": 0, "prompt_ids": [1]}, {"index": 1, "prompt_ids": [1]},
            {"index": 3, "prompt_ids": [7]}]
    assert held_out_prompts(rows, 2) == [(0, [1]), (1, [5, 6])]


PREFER_SHORTER = "def prefer_shorter(prompts, a, b):\n    return [float(len(x) < len(y)) for x, y in zip(a, b)]\n"


def test_callback_in_a_fit_writes_jsonl_metrics_and_wandb_tables(tiny_path, default_data_path, tmp_path,
                                                                 monkeypatch):
    """A real fit with csv + offline W&B loggers and a callable judge: step_<N>.jsonl per validation, gen/*
    in the CSV, a W&B table per step in the offline run."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from dpo_lightning import PreferenceDataModule
    from dpo_lightning.callbacks import GenerationEvaluation

    (tmp_path / "myjudges.py").write_text(PREFER_SHORTER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    L.seed_everything(0)
    dm = PreferenceDataModule(default_data_path, tokenizer=str(tiny_path), val_fraction=0.05, batch_size=8,
                              max_length=48, cache_dir=str(tmp_path / "cache"))
    cb = GenerationEvaluation({"num_prompts": 3, "num_samples": 2, "max_new_tokens": 8,
                               "judge": "myjudges:prefer_shorter"}, dirpath=str(tmp_path / "gen"))
    wandb_logger = WandbLogger(project="t", save_dir=str(tmp_path), offline=True)
    trainer = L.Trainer(max_steps=4, val_check_interval=2, accelerator="cpu", logger=[
        CSVLogger(str(tmp_path), name="csv", version=""), wandb_logger], callbacks=[cb],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    module = PreferenceLitModule(str(tiny_path), optimizer={"lr": 1e-2})
    trainer.fit(module, datamodule=dm)
    wandb_logger.experiment.finish()
    files = sorted(p.name for p in (tmp_path / "gen").glob("step_*.jsonl"))
    assert files == ["step_2.jsonl", "step_4.jsonl"]
    rows = [json.loads(x) for x in (tmp_path / "gen" / "step_4.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["step"] for r in rows} == {4}
    for r in rows:  # the callable judge's answer is known
        assert r["judge"] == float(len(r["policy"]) < len(r["reference"]))
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("gen/kl", "gen/kl_stderr", "gen/entropy", "gen/length", "gen/eos_rate", "gen/win_rate",
                 "gen/win_rate_stderr"):
        assert name in header, name
    assert cb.last_metrics["gen/win_rate"] == pytest.approx(sum(r["judge"] for r in rows) / 6)
    tables = sorted(p.name for p in tmp_path.glob("wandb/offline-run-*/files/media/table/generations/*.json"))
    assert any(t.startswith("step_2_") for t in tables) and any(t.startswith("step_4_") for t in tables), tables
