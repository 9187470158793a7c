"""Precomputed reference log-probs: equal to the live reference, cached, reused, invalidated on change."""

from __future__ import annotations

import types
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import rows_of

from dpo_lightning import PreferenceDataModule, PreferenceLitModule, get_loss
from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.data.datamodule import tokenizer_fingerprint
from dpo_lightning.engine.logprobs import sequence_logps
from dpo_lightning.models.hf import ModelSpec, load_causal_lm
from dpo_lightning.reference.cache import (
    PrecomputeError,
    attach,
    cached_reference_logps,
    compute_reference_logps,
    weights_fingerprint,
)
from dpo_lightning.training.inputs import build_inputs


@pytest.fixture(scope="module")
def policy(tiny_path):
    return load_causal_lm(ModelSpec(str(tiny_path)))


@pytest.mark.parametrize("ld_alpha,normalized", [(None, False), (0.3, False), (None, True), (0.7, True)])
def test_cached_values_give_the_live_reference_inputs(policy, tokenizer, ld_alpha, normalized):
    rows = rows_of(tokenizer)
    collator = PreferenceCollator(tokenizer.pad_token_id, layout="prefix_shared")
    values = compute_reference_logps(policy, rows, collator, batch_size=4)
    attach(rows, values)
    loss = types.SimpleNamespace(hparams={"ld_alpha": ld_alpha}, paired=True, length_normalized=normalized)
    batch = PreferenceCollator(tokenizer.pad_token_id)(rows)  # another layout than the precompute's
    with torch.no_grad():
        live = sequence_logps(policy, batch, batch["num_sequences"], full_logits=True)
    x_live, _ = build_inputs(loss, live, live, batch)
    x_cached, _ = build_inputs(loss, live, None, batch)
    torch.testing.assert_close(x_cached.ref_chosen_logps, x_live.ref_chosen_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(x_cached.ref_rejected_logps, x_live.ref_rejected_logps, atol=1e-5, rtol=0)


def test_cache_is_reused_and_invalidated_by_tokenizer_truncation_and_weights(policy, tokenizer, tmp_path,
                                                                           monkeypatch):
    from dpo_lightning.reference import cache as reference_cache

    rows = rows_of(tokenizer)
    collator = PreferenceCollator(tokenizer.pad_token_id, layout="prefix_shared")
    calls = []
    real = reference_cache.compute_reference_logps
    monkeypatch.setattr(reference_cache, "compute_reference_logps",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    w = weights_fingerprint(policy)
    base = dict(weights=w, tokenizer=tokenizer_fingerprint(tokenizer),
                truncation={"max_length": 64, "max_prompt_length": None, "truncation_mode": "keep_start"},
                cache_dir=tmp_path)
    v1, info1 = cached_reference_logps(rows, policy, collator, **base)
    v2, info2 = cached_reference_logps(rows, policy, collator, **base)
    assert (info1["hit"], info2["hit"], len(calls)) == (False, True, 1)
    assert all(torch.equal(v1[k], v2[k]) for k in v1)

    other_tok = type(tokenizer).from_pretrained(Path(tokenizer.name_or_path))
    other_tok.add_tokens(["<extra_token>"])
    changes = {"tokenizer": dict(base, tokenizer=tokenizer_fingerprint(other_tok)),
               "truncation": dict(base, truncation={**base["truncation"], "max_length": 48}),
               "weights": dict(base, weights=weights_fingerprint(policy.to(torch.bfloat16))),
               "data": base}
    policy.float()
    assert changes["weights"]["weights"] != w and changes["tokenizer"]["tokenizer"] != base["tokenizer"]
    for what, kw in changes.items():
        n = len(calls)
        data = rows[:-1] if what == "data" else rows
        _, info = cached_reference_logps(data, policy, collator, **kw)
        assert not info["hit"] and len(calls) == n + 1, what
    assert len(list(tmp_path.glob("reference/*.safetensors"))) == 5
    assert not list(tmp_path.glob("reference/.tmp-*"))  # written atomically


def test_precompute_in_training_reuses_cache_and_frees_the_reference(tiny_path, default_data_path, tmp_path,
                                                                     monkeypatch):
    """reference.precompute: computed once in setup (no reference copy), reused by a second run."""
    from dpo_lightning.reference import cache as reference_cache

    def run():
        module = PreferenceLitModule(str(tiny_path), loss=get_loss("sigmoid", beta=0.1, ld_alpha=0.5),
                                     reference={"precompute": True}, optimizer={"lr": 1e-3})
        assert module.reference.is_precomputed and module.reference.module is None
        dm = PreferenceDataModule(default_data_path, str(tiny_path), batch_size=4, max_length=64,
                                  val_fraction=0.2, cache_dir=str(tmp_path))
        trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=1, val_check_interval=2,
                            num_sanity_val_steps=0)
        trainer.fit(module, datamodule=dm)
        assert all("ref_chosen_shared_logps" in r for r in dm.train_rows + dm.val_rows)
        return module, dm

    computed = []
    real = reference_cache.compute_reference_logps
    monkeypatch.setattr(reference_cache, "compute_reference_logps",
                        lambda *a, **k: computed.append(len(a[1])) or real(*a, **k))
    _, dm = run()
    assert len(computed) == 2  # train rows and held-out rows
    first = [r["ref_chosen_logps"] for r in dm.train_rows]
    _, dm2 = run()
    assert len(computed) == 2  # the second run read the cache
    assert [r["ref_chosen_logps"] for r in dm2.train_rows] == first
    # the cached values are the initial policy's
    policy = load_causal_lm(ModelSpec(str(tiny_path)))
    rows = dm.train_rows[:4]
    batch = PreferenceCollator(dm.tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        live = sequence_logps(policy, batch, 8, full_logits=True).logps
    torch.testing.assert_close(torch.tensor([r["ref_chosen_logps"] for r in rows]), live[:4], atol=1e-5, rtol=0)


def test_lower_precision_reference(tiny_path, tokenizer, policy):
    rows = rows_of(tokenizer)
    collator = PreferenceCollator(tokenizer.pad_token_id, layout="prefix_shared")
    ref16 = load_causal_lm(ModelSpec(str(tiny_path), dtype="bfloat16"))
    v32 = compute_reference_logps(policy, rows, collator)
    v16 = compute_reference_logps(ref16, rows, collator)
    torch.testing.assert_close(v16["ref_chosen_logps"], v32["ref_chosen_logps"], atol=0.5, rtol=0.05)
    assert weights_fingerprint(ref16) != weights_fingerprint(policy)
    module = PreferenceLitModule(str(tiny_path), loss="sigmoid", reference={"dtype": "bfloat16"})
    assert next(module.reference.parameters()).dtype == torch.bfloat16


def test_kl_rows_cannot_be_precomputed(tiny_path, tokenizer):
    with pytest.raises(ValueError, match="precompute"):
        PreferenceLitModule(str(tiny_path), loss=get_loss("kto"), reference={"precompute": True})
    from dpo_lightning.data.collate import UnpairedCollator

    rows = [{"index": 0, "prompt_ids": [5], "completion_ids": [6, 7], "label": True}]
    with pytest.raises(PrecomputeError, match="KL rows"):
        compute_reference_logps(load_causal_lm(ModelSpec(str(tiny_path))), rows,
                                UnpairedCollator(0, kl_pairs=True))
