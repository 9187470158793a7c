"""Validation run chunk by chunk inside the tokenizing workers (``checks.py``, merged by ``DataValidator.absorb``)
equals one pass over the whole source: the same report (counts, example rows), the same kept rows, the first
error with its global row number, and duplicates found across chunks (the first occurrence kept)."""

from __future__ import annotations

import json

import pytest
from helpers import VALIDATION_CASES as CASES

from dpo_lightning.data import cache
from dpo_lightning.data.formats import DataError, pairs_to_unpaired
from dpo_lightning.data.tokenize import TruncationConfig, tokenize_records
from dpo_lightning.data.validate import DataValidator

CFG = TruncationConfig(max_length=16)
WORDS = ["mat", "dog", "hat", "log", "sat", "on", "cat", "the"]


def _clean(n: int) -> list[dict]:
    return [{"prompt": f"the {WORDS[i % 8]} sat on the {WORDS[i // 8 % 8]}", "chosen": "the mat", "rejected": "a log"}
            for i in range(n)]


def _source(tmp_path) -> tuple[str, list]:
    """Every reason once, spread over chunks of 3 rows, plus duplicates across chunks (one of a row whose
    completion is cut, a 'keep' reason that a dropped duplicate must not count again)."""
    rows = _clean(16)
    long = {"prompt": "the hat", "chosen": " ".join(["mat"] * 30), "rejected": "a log"}
    rows[2] = long
    for k, (row, _) in enumerate(CASES):
        rows.insert(3 + 2 * k, row)  # rows 3, 5, ... 21
    rows.insert(24, dict(rows[0]))  # a duplicate of row 0, seven chunks later
    rows.insert(26, dict(long))  # and of row 2
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), rows


@pytest.mark.parametrize("duplicates, paired", [("keep", None), ("drop", None), ("drop", False)])
def test_chunked_report_and_rows_equal_one_pass(tokenizer, tmp_path, monkeypatch, duplicates, paired):
    path, rows = _source(tmp_path)
    policies = {"missing_field": "drop", "non_string_field": "drop", "mixed_formats": "drop",
                "duplicate_pair": duplicates}
    one = DataValidator(policies)
    records = one.check(rows, path, tokenizer, CFG)
    expected, _ = tokenize_records(pairs_to_unpaired(records) if paired is False else records, tokenizer, CFG)
    monkeypatch.setattr(cache, "CHUNK_ROWS", 3)
    for num_proc in (2, 1):
        v = DataValidator(policies)
        got, _, split = cache.tokenize_source(path, "train", tokenizer, CFG, paired=paired, validator=v,
                                              num_proc=num_proc, cache_dir=tmp_path / f"c{num_proc}", progress=False)
        assert v.report == one.report
        assert split is (paired is False)
        assert [{k: v for k, v in r.items() if k != "index"} for r in got] == [
            {k: v for k, v in r.items() if k != "index"} for r in expected]
    src = one.report["sources"][path]
    assert src["by_reason"]["duplicate_pair"] == {"count": 2, "policy": duplicates, "rows": [24, 26]}
    assert src["by_reason"]["completion_truncated"]["rows"] == (
        [2, 19, 26] if duplicates == "keep" else [2, 19])  # a dropped duplicate is not checked further
    assert src["rows"] == len(rows) and src["kept"] == len(rows) - src["dropped"]
    kept_rows = sorted({r["index"] // 2 if paired is False else r["index"] for r in got})
    gone = {i for r, e in src["by_reason"].items() if e["policy"] == "drop" for i in e["rows"]}
    assert kept_rows == [i for i in range(len(rows)) if i not in gone]  # rows keep their source numbers


@pytest.mark.parametrize("num_proc", [2, 1])
def test_the_first_error_of_the_source_is_raised_with_its_row_number(tokenizer, tmp_path, monkeypatch, num_proc):
    monkeypatch.setattr(cache, "CHUNK_ROWS", 3)
    rows = _clean(20)
    rows[7] = {**rows[7], "prompt": "the cat </s> sat"}
    rows[13] = {"prompt": "the cat", "chosen": "the mat"}  # missing field: an error by default, later
    path = tmp_path / "bad.jsonl"

    def run(policies):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cache.tokenize_source(str(path), "train", tokenizer, CFG, validator=DataValidator(policies),
                              num_proc=num_proc, cache_dir=tmp_path / "c", progress=False)

    with pytest.raises(DataError, match=r"bad.jsonl: row 7: field 'prompt' contains the special token '</s>' "
                                        r"\[special_tokens;"):
        run({"special_tokens": "error"})
    with pytest.raises(DataError, match=r"bad.jsonl: row 13: missing field 'rejected' .*\[missing_field;"):
        run({})  # row 7 dropped (the default), row 13 is the first error
    rows[11] = dict(rows[4])  # a duplicate in the fourth chunk of a row in the second
    with pytest.raises(DataError, match=r"bad.jsonl: row 11: the same prompt, chosen and rejected as an earlier "
                                        r"row \[duplicate_pair;"):
        run({"duplicate_pair": "error"})
    rows[13] = {"prompt": "the cat", "chosen": "the mat", "rejected": "a log"}
    rows[16] = {"prompt": "the cat", "completion": "the mat", "label": True}
    with pytest.raises(DataError, match=r"bad.jsonl: row 16: paired and unpaired rows in one file"):
        run({})
    assert not [p for p in (tmp_path / "c").iterdir() if p.suffix != ".lock"]  # nothing half-written


def test_a_source_whose_first_rows_are_unreadable_learns_its_kind_further_on(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CHUNK_ROWS", 2)
    rows = [{"prompt": "x"}] * 5 + [{"prompt": "the cat", "completion": "the mat", "label": k % 2 == 0}
                                    for k in range(5)] + [_clean(1)[0]]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    v = DataValidator({"missing_field": "drop", "mixed_formats": "drop", "duplicate_pair": "keep"})  # rows repeat
    got, _, _ = cache.tokenize_source(str(path), "train", tokenizer, CFG, validator=v, num_proc=2,
                                      cache_dir=tmp_path / "c", progress=False)
    assert [r["index"] for r in got] == [5, 6, 7, 8, 9] and not got.paired
    by = v.report["sources"][str(path)]["by_reason"]
    assert by["missing_field"]["rows"] == [0, 1, 2, 3, 4] and by["mixed_formats"]["rows"] == [10]
