"""The held-out split holds out whole prompts (pairs, KTO rows, pairs split into KTO rows), seeded and the same in
every process; exact duplicate rows are dropped by default (``duplicate_pair``) and kept on request; the embedded
default dataset has no duplicate and its held-out prompts are unseen in training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dpo_lightning import PreferenceDataModule
from dpo_lightning.data.formats import DataError
from dpo_lightning.data.split import held_out_mask

WORDS = ["lamp", "river", "kite", "hat", "boat", "star", "cup", "bell"]  # words of the tiny vocabulary


def _pairs(n_prompts: int = 30, per_prompt: int = 3) -> list[dict]:
    return [{"prompt": f"the {WORDS[p % 8]} and the {WORDS[p // 8 % 8]} .", "chosen": f" the {WORDS[k]} is red",
             "rejected": f" the {WORDS[k]} is blue"} for p in range(n_prompts) for k in range(per_prompt)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _dm(path, tiny_path, tmp_path, **kw):
    kw.setdefault("val_fraction", 0.2)
    dm = PreferenceDataModule(path, str(tiny_path), batch_size=2, max_length=32,
                              cache_dir=str(tmp_path / "cache"), **kw)
    dm.setup("fit")
    return dm


def _prompts(rows) -> set[tuple]:
    return {tuple(r["prompt_ids"]) for r in rows}


@pytest.mark.parametrize("paired", [None, False])
def test_every_row_of_a_prompt_is_on_one_side(tiny_path, tmp_path, paired):
    path = _write(tmp_path / "pairs.jsonl", _pairs())
    dm = _dm(path, tiny_path, tmp_path, paired=paired)
    train, val = list(dm.train_rows), list(dm.val_rows)
    assert not _prompts(train) & _prompts(val)
    assert len(_prompts(val)) == 6 and len(_prompts(train)) == 24  # 20% of 30 prompts, all their rows
    assert len(val) == 6 * 3 * (2 if paired is False else 1)
    if paired is False:  # a split pair's two rows (2i, 2i+1) stay together too
        held = {r["index"] for r in val}
        assert all(i ^ 1 in held for i in held)


def test_unpaired_rows_are_held_out_by_prompt(tiny_path, tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": k % 2 == 0} for k, r in enumerate(_pairs())]
    dm = _dm(_write(tmp_path / "kto.jsonl", rows), tiny_path, tmp_path)
    assert "completion_ids" in dm.val_rows[0]
    assert not _prompts(dm.train_rows) & _prompts(dm.val_rows)
    assert len(_prompts(dm.val_rows)) == 6


@pytest.mark.subprocess
def test_the_split_is_seeded_and_the_same_in_another_process(tiny_path, tmp_path):
    path = _write(tmp_path / "pairs.jsonl", _pairs())
    dm = _dm(path, tiny_path, tmp_path)
    again = _dm(path, tiny_path, tmp_path)
    other_seed = _dm(path, tiny_path, tmp_path, seed=7)
    index = sorted(r["index"] for r in dm.val_rows)
    assert sorted(r["index"] for r in again.val_rows) == index
    assert sorted(r["index"] for r in other_seed.val_rows) != index
    # another process (another string-hash seed, as another DDP rank may have) computes the same split
    code = ("import json, sys; from dpo_lightning import PreferenceDataModule as D; "
            f"d = D({path!r}, {str(tiny_path)!r}, val_fraction=0.2, max_length=32, cache_dir={str(tmp_path / 'c2')!r});"
            " d.setup('fit'); print(json.dumps(sorted(int(i) for i in d.val_rows.index)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == index


def test_held_out_mask_on_plain_rows_and_a_single_prompt():
    rows = [{"index": i, "prompt_ids": [1, 2, i // 2]} for i in range(20)]  # ten prompts, two rows each
    held = held_out_mask(rows, val_fraction=0.3, seed=0)
    assert held.sum() == 6 and all(held[i] == held[i ^ 1] for i in range(20))
    with pytest.raises(DataError, match="every row has the same prompt; give a held-out file with data.val_path"):
        held_out_mask([{"index": i, "prompt_ids": [1]} for i in range(5)], val_fraction=0.2, seed=0)
    # a split pair whose rows' prompt tokens differ still stays together (rows 2i, 2i+1)
    split = [{"index": i, "prompt_ids": [i]} for i in range(20)]
    held = held_out_mask(split, val_fraction=0.5, seed=0, from_pairs=True)
    assert all(held[i] == held[i ^ 1] for i in range(20)) and held.sum() == 10


def test_duplicates_are_dropped_by_default_and_kept_on_request(tiny_path, tmp_path):
    rows = _pairs(10, 1)
    rows += [dict(rows[0]), dict(rows[3]), dict(rows[3])]
    path = _write(tmp_path / "pairs.jsonl", rows)
    report = tmp_path / "data_report.json"
    dm = _dm(path, tiny_path, tmp_path, val_fraction=0.0, report_path=str(report))
    assert len(dm.train_rows) == 10
    dup = json.loads(report.read_text())["sources"][path]["by_reason"]["duplicate_pair"]
    assert dup == {"count": 3, "policy": "drop", "rows": [10, 11, 12]}
    kept = _dm(path, tiny_path, tmp_path, val_fraction=0.0, validation={"duplicate_pair": "keep"})
    assert len(kept.train_rows) == 13
    # unpaired rows: the same (prompt, completion, label) again is a duplicate; another label is not
    kto = [{"prompt": "the lamp", "completion": " is red", "label": True},
           {"prompt": "the kite", "completion": " is blue", "label": False}]
    kto += [dict(kto[0]), {**kto[0], "label": False}]
    dm = _dm(_write(tmp_path / "kto.jsonl", kto), tiny_path, tmp_path, val_fraction=0.0)
    assert len(dm.train_rows) == 3
    assert dm.validator.report["sources"][str(tmp_path / "kto.jsonl")]["by_reason"]["duplicate_pair"]["rows"] == [2]


def test_the_embedded_default_has_no_duplicates_and_unseen_held_out_prompts(tiny_path, tmp_path, default_data_path):
    rows = [json.loads(line) for line in open(default_data_path)]
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows)
    dm = _dm("builtin:default_prefs", tiny_path, tmp_path, val_fraction=0.15)
    assert len(dm.train_rows) + len(dm.val_rows) == len(rows)
    assert len(dm.val_rows) >= 100 and not _prompts(dm.train_rows) & _prompts(dm.val_rows)
    assert np.all(np.isin(dm.val_rows.index, dm.train_rows.index, invert=True))
