"""Generation evaluation scores against the reference whenever training has one, precomputed or not."""

from __future__ import annotations

import pytest
import torch

from dpo_lightning import GenerationSettings, PreferenceLitModule
from dpo_lightning.evaluation.generation import generate_and_score, summarize


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["user : good morning . assistant :", "user : describe the school . assistant :"]
    return [(i, tokenizer(t)["input_ids"]) for i, t in enumerate(texts)]


def _move(module: PreferenceLitModule, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def test_precomputed_reference_is_opened_for_generation_and_scores_as_the_live_one(tiny_path, tokenizer, prompts):
    torch.set_num_threads(1)
    settings = GenerationSettings(num_samples=2, max_new_tokens=8)
    cached = PreferenceLitModule(str(tiny_path), reference={"precompute": True})
    assert cached.reference.is_precomputed and cached.reference.module is None
    records, refs = generate_and_score(cached, tokenizer, prompts, settings, seed=0)
    assert all(r["kl"] == 0.0 for r in records)  # the initial weights, loaded again: exactly the policy's
    assert sorted(refs) == [0, 1] and summarize(records)["gen/kl"] == 0.0
    live = PreferenceLitModule(str(tiny_path))
    _move(cached), _move(live)
    got, _ = generate_and_score(cached, tokenizer, prompts, settings, seed=0, reference_samples=refs)
    want, _ = generate_and_score(live, tokenizer, prompts, settings, seed=0, reference_samples=refs)
    assert [r["policy"] for r in got] == [r["policy"] for r in want]
    assert [r["kl"] for r in got] == pytest.approx([r["kl"] for r in want], abs=1e-4)
    assert summarize(got)["gen/kl"] > 0
    assert cached.reference.module is None  # released after the pass: no model held between validations


def test_without_opening_a_precomputed_reference_gen_kl_is_skipped(tiny_path, tokenizer, prompts):
    cached = PreferenceLitModule(str(tiny_path), reference={"precompute": True})
    records, _ = generate_and_score(cached, tokenizer, prompts, GenerationSettings(num_samples=1, max_new_tokens=4),
                                    seed=0, open_reference=False)
    assert all(r["kl"] is None for r in records) and "gen/kl" not in summarize(records)
