"""Property-based (hypothesis): arbitrary unicode, empty strings, special tokens, very long words and mixed formats
through formats -> validation -> tokenize -> collate never crash deep inside: either one clear DataError naming the
file and row, or valid batches. Bounded: few examples, tiny rows; the GPT-2 tokenizer runs where ../shared/data is."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpo_lightning.data.collate import PreferenceCollator, UnpairedCollator
from dpo_lightning.data.formats import DataError
from dpo_lightning.data.tokenize import TruncationConfig, tokenize_records
from dpo_lightning.data.validate import DataValidator

WHERE = "prop.jsonl"
SPECIAL = ["</s>", "<s>", "<unk>", "<pad>", "<|endoftext|>", "\n\nAssistant:", "\n\nHuman:"]

plain = st.sampled_from(["the", "cat", "sat", "on", "mat", "dog", "a", "é", "日本", "🙂", "x1", "?"])
words = st.one_of(
    plain, plain, plain, plain,
    st.text(max_size=12),                                      # any unicode (no lone surrogates), incl. ""
    st.sampled_from(SPECIAL),
    st.integers(50, 400).map(lambda n: "x" * n),              # one very long word
    st.sampled_from(["", " ", "\t\n", "the", "cat", "mat", "é", "日本", "🙂", "\u200b"]),
)
texts = st.lists(words, min_size=1, max_size=8).map(" ".join)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": texts}),
                    min_size=0, max_size=3)
user = st.builds(lambda t: [{"role": "user", "content": t}], texts)
answer = st.builds(lambda t: [{"role": "assistant", "content": t}], texts)
KINDS = {  # one file's rows share a shape; values are arbitrary text
    "explicit": st.fixed_dictionaries({"prompt": texts, "chosen": texts, "rejected": texts}),
    "implicit": st.builds(lambda h, a, b: {"chosen": f"\n\nHuman: {h}\n\nAssistant: {a}",
                                           "rejected": f"\n\nHuman: {h}\n\nAssistant: {b}"}, texts, texts, texts),
    "conversational": st.fixed_dictionaries({"prompt": user, "chosen": answer, "rejected": answer}),
    "unpaired": st.fixed_dictionaries({"prompt": texts, "completion": texts, "label": st.booleans()}),
}
BAD = st.sampled_from([None, 7, 1.5, [], [{"role": "user"}], {"a": 1}, "DELETE"])


@st.composite
def files(draw):
    """Rows of one shape; sometimes one field of one row broken, or a row of another shape mixed in."""
    rows = draw(st.lists(KINDS[draw(st.sampled_from(sorted(KINDS)))], min_size=1, max_size=4))
    damage = draw(st.sampled_from(["none", "none", "field", "mixed"]))
    if damage == "field":
        r = rows[draw(st.integers(0, len(rows) - 1))]
        key, bad = draw(st.sampled_from(sorted(r))), draw(BAD)
        r.pop(key) if bad == "DELETE" else r.__setitem__(key, bad)
    elif damage == "mixed":
        rows.insert(draw(st.integers(0, len(rows))), draw(KINDS[draw(st.sampled_from(sorted(KINDS)))]))
    return rows


def run_pipeline(rows, tokenizer, cfg):
    try:
        records = DataValidator().check(rows, WHERE, tokenizer, cfg)
    except DataError as err:  # the clear error: names the file and the row (or says every row went)
        msg = str(err)
        assert msg.startswith(f"{WHERE}: ") and ("row " in msg or "every row" in msg or "empty" in msg), msg
        return
    tok_rows, _ = tokenize_records(records, tokenizer, cfg)
    if not tok_rows:
        return  # the datamodule turns this into a DataError (tested elsewhere)
    paired = "chosen_ids" in tok_rows[0]
    for layout in ("plain", "prefix_shared", "packed"):
        collate = (PreferenceCollator(tokenizer.pad_token_id, layout=layout) if paired
                   else UnpairedCollator(tokenizer.pad_token_id, kl_pairs=len(tok_rows) > 1, layout=layout))
        batch = collate(tok_rows)
        B = len(tok_rows)
        assert batch["index"].numel() == B
        assert batch["num_sequences"] == (2 * B if paired or len(tok_rows) > 1 else B)
        assert batch["input_ids"].max() < len(tokenizer) and batch["input_ids"].min() >= 0
        assert int(batch["score_seq"].max()) < batch["num_sequences"]
        assert batch["score_tgt"].numel() == sum(len(r.get("chosen_ids", r.get("completion_ids"))) +
                                                 len(r.get("rejected_ids", [])) for r in tok_rows) + (
            0 if paired or B == 1 else sum(len(r["completion_ids"]) for r in tok_rows))


PROPS = settings(max_examples=60, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPS
@given(rows=files(), max_length=st.sampled_from([4, 16, 64, None]))
def test_tiny_tokenizer_pipeline_never_crashes_deep_inside(tokenizer, rows, max_length):
    run_pipeline(rows, tokenizer, TruncationConfig(max_length=max_length))


@pytest.fixture(scope="module")
def gpt2(request):
    shared = request.getfixturevalue("shared_data")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared / "gpt2-tokenizer"))
    tok.pad_token = tok.eos_token
    return tok


@settings(PROPS, max_examples=30)
@given(rows=files(), max_length=st.sampled_from([8, 64]))
def test_gpt2_tokenizer_pipeline_never_crashes_deep_inside(gpt2, rows, max_length):
    run_pipeline(rows, gpt2, TruncationConfig(max_length=max_length))
