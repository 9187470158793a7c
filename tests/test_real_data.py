"""The real GPT-2 tokenizer and Anthropic HH-RLHF pairs from ../shared/data (skipped where absent)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from dpo_lightning.data.datamodule import tokenize_cached
from dpo_lightning.data.formats import load_records, normalize
from dpo_lightning.data.tokenize import TruncationConfig


@pytest.fixture(scope="module")
def hh(shared_data):
    path = shared_data / "hh-rlhf-harmless-base-test.jsonl.gz"
    return path, normalize(load_records(path), str(path))


@pytest.fixture(scope="module")
def gpt2_tok(shared_data):
    from dpo_lightning.models.hf import ModelSpec, load_tokenizer

    return load_tokenizer(ModelSpec(str(shared_data / "gpt2-tokenizer")))


def test_hh_prompts_are_extracted_up_to_the_last_assistant_turn(hh):
    _, rows = hh
    assert len(rows) == 1500
    assert all(r["prompt"].endswith("\n\nAssistant:") for r in rows)
    assert all(r["prompt"].startswith("\n\nHuman:") for r in rows)
    assert sum(r["chosen"] != r["rejected"] for r in rows) > 1400


def test_hh_tokenization_follows_trl(hh, gpt2_tok, tmp_path):
    _, rows = hh
    cfg = TruncationConfig(max_length=256)
    tok_rows, dropped = tokenize_cached(rows[:300], gpt2_tok, cfg, num_proc=2, cache_dir=tmp_path)
    again, _ = tokenize_cached(rows[:300], gpt2_tok, cfg, num_proc=1, cache_dir=tmp_path)  # cache hit
    assert again == tok_rows and len([p for p in tmp_path.iterdir() if p.suffix != ".lock"]) == 1
    assert len(tok_rows) + sum(dropped.values()) == 300
    eos = gpt2_tok.eos_token_id
    for r in tok_rows[:50]:
        rec = rows[r["index"]]
        full = gpt2_tok(rec["prompt"] + rec["chosen"] + gpt2_tok.eos_token)["input_ids"]
        assert r["prompt_ids"] + r["chosen_ids"] == full[: len(r["prompt_ids"]) + len(r["chosen_ids"])]
        if len(full) <= 256:
            assert r["chosen_ids"][-1] == eos
        assert len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 256


def test_hh_dpo_steps_on_a_gpt2_vocab_model(hh, shared_data, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_lightning import PreferenceDataModule, PreferenceLitModule, get_loss

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    path, _ = hh
    dm = PreferenceDataModule(str(path), str(shared_data / "gpt2-tokenizer"), batch_size=2, max_length=128,
                              val_fraction=0.99, cache_dir=str(tmp_path / "cache"))
    module = PreferenceLitModule({"name_or_path": str(tmp_path / "m"), "attn_implementation": "sdpa"},
                                 loss=get_loss("sigmoid", beta=0.1), optimizer={"lr": 1e-3})
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=2)
    trainer.fit(module, datamodule=dm)
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert trainer.global_step == 2 and all(torch.isfinite(torch.tensor(v)) for v in val.values())
