"""Tokenization speed-ups: batched encoding and a fast prompt split are exact, and the
tokenizer's fingerprint (the caches' key) does not change once the tokenizer has been used."""

from __future__ import annotations

from dpo_lightning.data.datamodule import tokenizer_fingerprint
from dpo_lightning.data.formats import extract_prompt, load_records, normalize
from dpo_lightning.data.tokenize import TruncationConfig, tokenize_completions, tokenize_records


def test_batched_tokenization_equals_one_text_at_a_time(shared_data):
    from dpo_lightning.models.hf import ModelSpec, load_tokenizer

    tok = load_tokenizer(ModelSpec(str(shared_data / "gpt2-tokenizer")))
    before = tokenizer_fingerprint(tok)
    path = shared_data / "hh-rlhf-harmless-base-test.jsonl.gz"
    records = normalize(load_records(path), str(path))[:150]
    rows, _ = tokenize_records(records, tok, TruncationConfig(max_length=None))
    for r in rows:
        rec = records[r["index"]]
        assert tokenize_completions(tok, rec["prompt"], [rec["chosen"], rec["rejected"]]) == (
            r["prompt_ids"], [r["chosen_ids"], r["rejected_ids"]])
    assert tokenizer_fingerprint(tok) == before  # encoding leaves call-time state; the key ignores it


def test_prompt_split_finds_the_character_common_prefix():
    for a, b, n in [("abc", "abd", 2), ("abc", "abc", 3), ("", "x", 0), ("xy", "x", 1), ("q r", "q s", 2)]:
        prompt, _, _ = extract_prompt(a, b)
        assert prompt == (a[:n - 1] if n and n < len(a) and a[n - 1] == " " else a[:n])
