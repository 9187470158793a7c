"""Data validation: every reason is detected, counted, and handled by its policy (error naming file + row + field,
drop and count, or keep and count); all rows dropped is an error; the report is written as data_report.json."""

from __future__ import annotations

import json

import pytest
from helpers import OK_ROW as OK
from helpers import VALIDATION_CASES as CASES

from dpo_lightning import PreferenceDataModule
from dpo_lightning.data.formats import DataError
from dpo_lightning.data.tokenize import TruncationConfig
from dpo_lightning.data.validate import DataValidator, check_policies

CFG = TruncationConfig(max_length=16)


def _check(rows, tokenizer, **policies):
    v = DataValidator(policies)
    return v, v.check(rows, "pairs.jsonl", tokenizer, CFG)


@pytest.mark.parametrize("row, reason", CASES, ids=[r for _, r in CASES])
def test_each_reason_is_found_and_follows_its_policy(tokenizer, row, reason):
    rows = [OK, row]
    default = DataValidator().policies[reason]
    if default == "error":
        with pytest.raises(DataError, match=rf"^pairs.jsonl: row 1: .*\[{reason};"):
            _check(rows, tokenizer)
        v, kept = _check(rows, tokenizer, **{reason: "drop"})
    else:
        v, kept = _check(rows, tokenizer)
    by = v.report["sources"]["pairs.jsonl"]["by_reason"]
    assert by[reason]["count"] == 1 and by[reason]["rows"] == [1], by
    assert len(kept) == (2 if v.policies[reason] == "keep" else 1)
    if reason not in ("missing_field", "non_string_field", "mixed_formats", "prompt_fills_max_length"):
        with pytest.raises(DataError, match=rf"pairs.jsonl: row 1: .*\[{reason};"):
            _check(rows, tokenizer, **{reason: "error"})


def test_trailing_eos_is_not_a_special_token_problem_and_clean_rows_pass(tokenizer):
    rows = [OK, {"prompt": "the cat", "chosen": "the mat</s>", "rejected": "the dog"}]
    v, kept = _check(rows, tokenizer)
    assert len(kept) == 2 and v.report["sources"]["pairs.jsonl"]["by_reason"] == {}


def test_all_rows_dropped_is_an_error_and_bad_policies_are_refused(tokenizer):
    with pytest.raises(DataError, match="every row was dropped by validation"):
        _check([{**OK, "rejected": OK["chosen"]}] * 3, tokenizer)
    with pytest.raises(ValueError, match=r"data.validation.bogus: unknown reason"):
        check_policies({"bogus": "drop"})
    with pytest.raises(ValueError, match=r"data.validation.missing_field='keep': use one of \('error', 'drop'\)"):
        check_policies({"missing_field": "keep"})


def test_datamodule_writes_the_report_and_caches_it(tmp_path, tiny_path, capsys, monkeypatch):
    from dpo_lightning.data import cache

    data = tmp_path / "pairs.jsonl"
    rows = [OK, {**OK, "prompt": "a dog sat on"}, {**OK, "rejected": OK["chosen"]}, OK]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = tmp_path / "run" / "data_report.json"
    for run in range(2):  # the second setup is a cache hit: no row is read or checked, the report comes back
        if run:
            monkeypatch.setattr(cache, "_work", lambda task: pytest.fail("a cache hit must not check or tokenize"))
        dm = PreferenceDataModule(str(data), str(tiny_path), batch_size=2, max_length=32, report_path=str(report),
                                  validation={"duplicate_pair": "drop"}, cache_dir=str(tmp_path / "cache"))
        dm.setup("fit")
        assert len(dm.train_rows) == 2
    src = json.loads(report.read_text())["sources"][str(data)]
    assert src["rows"] == 4 and src["kept"] == 2
    assert {r: v["count"] for r, v in src["by_reason"].items()} == {"identical_completions": 1, "duplicate_pair": 1}
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"]  # one entry: arrays and report
    assert json.loads((entry / "meta.json").read_text())["report"] == src
    assert "data report: " + str(data) + ": 4 rows, 2 kept" in capsys.readouterr().out
