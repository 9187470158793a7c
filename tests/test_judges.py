"""Judges: a tiny reward model built offline (save_pretrained -> from_pretrained), a callable by import path,
none; and a reward-model judge inside generation evaluation (gen/win_rate, gen/reward)."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_lightning.evaluation.judges import CallableJudge, RewardModelJudge, build_judge


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tokenizer):
    """A tiny Llama sequence classifier (1 label) and the tiny tokenizer, saved like a hub reward model."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    path = tmp_path_factory.mktemp("rm")
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_model_judge_scores_each_text_and_prefers_bradley_terry(reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts = ["user : hi assistant :", "user : describe the apple . assistant :", "user : hi assistant :"]
    a = [" hello ! how can i help you today ?", " the apple is friendly .", " go away ."]
    b = [" go away .", " the apple is dreadful .", " hello !"]
    judge = build_judge(str(reward_model), batch_size=2)
    assert isinstance(judge, RewardModelJudge)
    got_a, got_b = judge.score(prompts, a), judge.score(prompts, b)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    tok = AutoTokenizer.from_pretrained(reward_model)
    for p, x, g in zip(prompts + prompts, a + b, got_a + got_b):  # one text at a time: no padding involved
        with torch.no_grad():
            want = rm(**tok(p + x, return_tensors="pt")).logits[0, 0].item()
        assert g == pytest.approx(want, abs=1e-5)
    probs = judge.compare(prompts, a, b)
    assert probs == pytest.approx([1 / (1 + math.exp(y - x)) for x, y in zip(got_a, got_b)])
    assert len(set(round(p, 6) for p in probs)) > 1


def test_callable_judge_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(
        "def prefer_shorter(prompts, a, b):\n    return [len(x) < len(y) for x, y in zip(a, b)]\n"
        "def broken(prompts, a, b):\n    return [2.0] * len(a)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = build_judge("my_judges:prefer_shorter")
    assert isinstance(judge, CallableJudge)
    assert judge.compare(["p", "p", "p"], ["a", "abc", "ab"], ["abc", "a", "ab"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"returned 2.0; a judge returns probabilities in \[0, 1\]"):
        build_judge("my_judges:broken").compare(["p"], ["a"], ["b"])
    with pytest.raises(ValueError, match=r"generation.judge='my_judges:nope': cannot import it"):
        build_judge("my_judges:nope")
    assert build_judge(None) is None and build_judge("none") is None


def test_missing_reward_model_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="generation.judge=.*cannot load a reward model"):
        build_judge(str(tmp_path / "nowhere")).score(["p"], ["a"])


def test_reward_model_judge_in_generation_gives_win_rate_and_reward(tiny_path, tokenizer, reward_model):
    from dpo_lightning import GenerationSettings, PreferenceLitModule
    from dpo_lightning.evaluation.generation import generate_and_score, summarize

    torch.set_num_threads(1)
    module = PreferenceLitModule(str(tiny_path))
    judge = build_judge(str(reward_model))
    prompts = [(i, tokenizer(t)["input_ids"]) for i, t in enumerate(["user : hi assistant :",
                                                                      "user : good morning . assistant :"])]
    records, _ = generate_and_score(module, tokenizer, prompts, GenerationSettings(num_samples=2, max_new_tokens=6),
                                    judge=judge, seed=0)
    metrics = summarize(records)
    rewards = judge.score([r["prompt"] for r in records], [r["policy"] for r in records])
    assert metrics["gen/reward"] == pytest.approx(sum(rewards) / len(rewards))
    ref_rewards = judge.score([r["prompt"] for r in records], [r["reference"] for r in records])
    want = [1 / (1 + math.exp(y - x)) for x, y in zip(rewards, ref_rewards)]
    assert [r["judge"] for r in records] == pytest.approx(want)
    assert metrics["gen/win_rate"] == pytest.approx(sum(want) / len(want)) and "gen/win_rate_stderr" in metrics


def test_dpo_eval_generates_on_an_export_with_a_reward_model_judge(tiny_path, reward_model, tmp_path,
                                                                  default_data_path):
    """dpo-eval generation.num_prompts=4 generation.judge=<reward model> on an exported (moved) policy:
    gen/kl, gen/win_rate and gen/reward in eval.json, the samples in generations.jsonl beside it (40 pairs of
    the embedded data: val/loss needs no more)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_lightning.cli.locate import compose
    from dpo_lightning.evaluate import evaluate

    torch.set_num_threads(1)
    export = tmp_path / "export"
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(export)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(export)
    out, data = tmp_path / "eval" / "eval.json", tmp_path / "pairs.jsonl"
    data.write_text("".join(open(default_data_path).readlines()[:40]))
    cfg = compose("eval", [f"model.name_or_path={export}", f"data.path={data}", "reference.name_or_path=builtin:tiny-llama",
                           "data.max_length=32", f"output_json={out}", f"paths.output_dir={tmp_path / 'eval'}",
                           "generation.num_prompts=4", "generation.max_new_tokens=6",
                           f"generation.judge={reward_model}", f"data.cache_dir={tmp_path / 'cache'}"])
    metrics = evaluate(cfg)
    report = json.loads(out.read_text())
    for name in ("gen/kl", "gen/kl_stderr", "gen/win_rate", "gen/reward", "gen/length", "val/loss"):
        assert name in report["metrics"] and name in metrics, name
    rows = [json.loads(x) for x in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and report["generations"].endswith("generations.jsonl")
    assert report["metrics"]["gen/kl"] == pytest.approx(sum(r["kl"] for r in rows) / 8, abs=1e-5)
    assert report["metrics"]["gen/kl"] != 0.0  # the export differs from its reference


def test_a_judge_that_does_not_import_is_refused_before_training():
    from dpo_lightning.cli.locate import compose
    from dpo_lightning.config.validate import ConfigError, validate_config

    with pytest.raises(ConfigError, match="generation.judge='no_such_pkg:judge': cannot import it"):
        validate_config(compose("train", ["generation.judge=no_such_pkg:judge", "paths.output_dir=/tmp/x"]))
    with pytest.raises(ConfigError, match="generation.num_samples=0: must be >= 1"):
        validate_config(compose("train", ["generation.num_samples=0", "paths.output_dir=/tmp/x"]))
