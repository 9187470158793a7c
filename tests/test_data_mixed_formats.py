"""Rows that mix formats: a text prompt with message-list completions becomes a user turn and keeps its prompt
ids; a text prompt repeated inside whole conversations is extracted; one the conversations lack is refused."""

from __future__ import annotations

import pytest

from dpo_lightning.data.formats import DataError, normalize
from dpo_lightning.data.tokenize import TruncationConfig, tokenize_records

PROMPT = [223, 21, 116, 10, 31, 21]  # "user : hi . assistant :" (ids of the tiny tokenizer, see test_tokenize.py)


def test_text_prompt_with_assistant_message_completions_becomes_a_user_turn(tokenizer):
    row = {"prompt": "hi .", "chosen": [{"role": "assistant", "content": "hello !"}],
           "rejected": [{"role": "assistant", "content": "go away ."}]}
    (rec,) = normalize([row], where="t.jsonl")
    assert rec["prompt"] == [{"role": "user", "content": "hi ."}]
    (tok,), _ = tokenize_records([rec], tokenizer, TruncationConfig(max_length=None))
    assert tok["prompt_ids"] == PROMPT  # the prompt is scored against, not dropped


def test_message_prompt_with_text_completions_keeps_the_prompt():
    row = {"prompt": [{"role": "user", "content": "hi ."}], "chosen": "hello !", "rejected": "go away ."}
    (rec,) = normalize([row], where="t.jsonl")
    assert rec["prompt"] == [{"role": "user", "content": "hi ."}]
    assert rec["chosen"] == [{"role": "assistant", "content": "hello !"}]


def test_text_prompt_repeated_inside_full_conversations_is_extracted():
    """HuggingFaceH4/ultrafeedback_binarized: prompt text, and chosen/rejected as whole conversations."""
    user = {"role": "user", "content": "hi ."}
    row = {"prompt": "hi .", "chosen": [user, {"role": "assistant", "content": "hello !"}],
           "rejected": [user, {"role": "assistant", "content": "go away ."}]}
    (rec,) = normalize([row], where="t.jsonl")
    assert rec["prompt"] == [user] and rec["chosen"] == [{"role": "assistant", "content": "hello !"}]


def test_text_prompt_that_the_conversations_do_not_contain_is_refused():
    user = {"role": "user", "content": "something else"}
    row = {"prompt": "hi .", "chosen": [user, {"role": "assistant", "content": "hello !"}],
           "rejected": [user, {"role": "assistant", "content": "go away ."}]}
    with pytest.raises(DataError, match=r"t.jsonl: row 0: field 'prompt'"):
        normalize([row], where="t.jsonl")
