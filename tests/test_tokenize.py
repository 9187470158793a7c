"""Tokenization (TRL 1.16's convention), truncation and collation, with literal expected tensors.

Tiny tokenizer ids used below: user=213 ':'=21 hi=112 '.'=10 assistant=29 hello=109 '!'=4 go=102 away=31
</s>=3 (EOS) <pad>=0.
"""

import pytest
import torch

from dpo_lightning.data.collate import PreferenceCollator, UnpairedCollator
from dpo_lightning.data.tokenize import TruncationConfig, tokenize_completions, tokenize_records, truncate

PROMPT = [223, 21, 116, 10, 31, 21]  # "user : hi . assistant :"
CHOSEN = [112, 4, 3]  # " hello !" + EOS
REJECTED = [105, 33, 10, 3]  # " go away ." + EOS


def test_text_pair_tokenized_with_eos(tokenizer):
    assert tokenize_completions(tokenizer, "user : hi . assistant :", [" hello !", " go away ."]) == \
        (PROMPT, [CHOSEN, REJECTED])


def test_eos_not_doubled(tokenizer):
    _, (c,) = tokenize_completions(tokenizer, "user : hi . assistant :", [" hello !</s>"])
    assert c == CHOSEN


def test_conversational_pair_uses_chat_template(tokenizer):
    user = [{"role": "user", "content": "hi ."}]
    p, cs = tokenize_completions(tokenizer, user, [[{"role": "assistant", "content": "hello !"}],
                                                   [{"role": "assistant", "content": "go away ."}]])
    assert p == PROMPT and cs == [CHOSEN, REJECTED]  # the tiny template ends assistant turns with </s>


def test_implicit_prompt_row_matches_explicit(tokenizer):
    rows, _ = tokenize_records([{"prompt": "user : hi . assistant :", "chosen": " hello !",
                                 "rejected": " go away ."}], tokenizer, TruncationConfig(max_length=None))
    assert rows == [{"index": 0, "prompt_ids": PROMPT, "chosen_ids": CHOSEN, "rejected_ids": REJECTED}]


@pytest.mark.parametrize("cfg, expected", [
    # keep_start: completions cut so prompt + completion <= max_length (TRL 1.16's [:max_length])
    (TruncationConfig(max_length=8), (PROMPT, [[112, 4], [105, 33]])),
    # keep_end: oldest prompt tokens go so the longer completion (4) fits whole
    (TruncationConfig(max_length=8, truncation_mode="keep_end"), ([116, 10, 31, 21], [CHOSEN, REJECTED])),
    # max_prompt_length first, with the mode deciding which prompt end survives
    (TruncationConfig(max_length=None, max_prompt_length=2), ([223, 21], [CHOSEN, REJECTED])),
    (TruncationConfig(max_length=None, max_prompt_length=2, truncation_mode="keep_end"), ([31, 21], [CHOSEN, REJECTED])),
    (TruncationConfig(max_length=6), (None, "prompt_fills_max_length")),
])
def test_truncation_modes(cfg, expected):
    assert truncate(PROMPT, [CHOSEN, REJECTED], cfg) == expected


LONG = list(range(100, 112))  # a completion longer than the room max_length leaves


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_a_completion_longer_than_the_room_keeps_its_beginning(mode):
    prompt, (chosen, rejected) = truncate(PROMPT, [LONG, [7, 8]], TruncationConfig(max_length=8, truncation_mode=mode))
    assert chosen == LONG[: 8 - len(prompt)]  # the tokens that follow the prompt, never the tail
    assert rejected == [7, 8] and len(prompt) + len(chosen) <= 8
    if mode == "keep_end":
        assert prompt == PROMPT[-len(prompt):]  # keep_end still keeps the prompt's end


def test_dropped_rows_are_counted(tokenizer):
    recs = [{"prompt": "user : hi . assistant :", "chosen": " hello !", "rejected": " go away ."},
            {"prompt": "user : hi . hi . hi . assistant :", "chosen": " hello !", "rejected": " go ."}]
    rows, dropped = tokenize_records(recs, tokenizer, TruncationConfig(max_length=9))
    assert [r["index"] for r in rows] == [0] and dict(dropped) == {"prompt_fills_max_length": 1}


def test_bad_truncation_settings_are_rejected():
    with pytest.raises(ValueError, match="truncation_mode='middle'"):
        TruncationConfig(truncation_mode="middle")


def test_collator_plain_layout_literal():
    """Same contract as TRL 1.16's DataCollatorForPreference docstring example, plus the score index."""
    batch = PreferenceCollator(pad_token_id=0)([
        {"index": 5, "prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
        {"index": 9, "prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]},
    ])
    assert torch.equal(batch["input_ids"], torch.tensor(
        [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]))
    assert torch.equal(batch["completion_mask"], torch.tensor(
        [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]))
    # token (row r, col c) is predicted by hidden row r*5 + c - 1
    assert batch["score_src"].tolist() == [2, 3, 6, 12, 16, 17]
    assert batch["score_tgt"].tolist() == [4, 5, 9, 6, 10, 11]
    assert batch["score_seq"].tolist() == [0, 0, 1, 2, 3, 3]
    assert batch["score_pos"].tolist() == [1, 2, 1, 1, 1, 2]
    assert batch["index"].tolist() == [5, 9] and batch["num_sequences"] == 4


def test_unpaired_collator_with_kl_pairs():
    rows = [{"index": 0, "prompt_ids": [1], "completion_ids": [2], "label": True},
            {"index": 1, "prompt_ids": [3], "completion_ids": [4, 5], "label": False}]
    batch = UnpairedCollator(pad_token_id=0, kl_pairs=True)(rows)
    # rows 2, 3: prompt i with completion i-1 (mod B), TRL KTOTrainer's mismatched KL pairs
    assert batch["input_ids"].tolist() == [[1, 2, 0], [3, 4, 5], [1, 4, 5], [3, 2, 0]]
    assert batch["label"].tolist() == [True, False] and batch["num_sequences"] == 4
