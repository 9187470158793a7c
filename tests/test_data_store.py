"""The tokenized-data store: rows as flat memory-mapped arrays, tokenized in worker processes.

Exactness: whatever the chunking and the number of processes, the rows read back from the cache equal
``tokenize_records`` (TRL's semantics) row for row, and every view (held-out split, units, lengths) equals
its list-of-dicts counterpart.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from dpo_lightning import PreferenceDataModule
from dpo_lightning.data import cache
from dpo_lightning.data.formats import DataError
from dpo_lightning.data.store import TokenRows
from dpo_lightning.data.tokenize import TruncationConfig, tokenize_records
from dpo_lightning.data.units import make_units, unit_positions


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _pairs(n):
    words = ["hi", "hello", "go", "away", "user", "assistant"]
    return [{"prompt": f"user : {' '.join(words[: 1 + i % 5])} . assistant :",
             "chosen": f" {words[i % 6]} {'!' * (1 + i % 3)}", "rejected": f" go away {'.' * (1 + i % 4)}"}
            for i in range(n)]


@pytest.mark.parametrize("kind", ["paired", "unpaired"])
def test_cached_rows_equal_tokenize_records_in_any_chunking(tokenizer, tmp_path, monkeypatch, kind):
    records = _pairs(23)
    if kind == "unpaired":
        records = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 3 > 0}
                   for i, r in enumerate(records)]
    cfg = TruncationConfig(max_length=9)  # some rows are dropped, some cut
    expected, dropped = tokenize_records(records, tokenizer, cfg)
    assert dropped and len(expected) < len(records)
    monkeypatch.setattr(cache, "CHUNK_ROWS", 5)  # several chunks, in two worker processes
    for num_proc, folder in ((2, "a"), (1, "b")):
        rows, got_dropped = cache.tokenize_cached(records, tokenizer, cfg, num_proc=num_proc,
                                                  cache_dir=tmp_path / folder, progress=False)
        assert isinstance(rows, TokenRows) and list(rows) == expected and got_dropped == dropped


def test_cache_is_npy_memory_mapped_and_a_hit_tokenizes_nothing(tokenizer, tmp_path, monkeypatch):
    path = _write(tmp_path / "d.jsonl", _pairs(12))
    first, _, _ = cache.tokenize_source(path, "train", tokenizer, TruncationConfig(None), cache_dir=tmp_path / "c",
                                        progress=False)
    (entry,) = (p for p in (tmp_path / "c").iterdir() if p.suffix != ".lock")  # <key>.lock: the builders' lock
    assert sorted(p.name for p in entry.iterdir()) == sorted(
        ["meta.json", "index.npy", "label.npy"] + [f"{f}{s}.npy" for f in ("prompt", "a", "b") for s in ("", "_off")])
    assert all(np.load(p, allow_pickle=False).dtype != object for p in entry.glob("*.npy"))  # no pickle
    monkeypatch.setattr(cache, "_work", lambda task: pytest.fail("a cache hit must not tokenize"))
    again, _, _ = cache.tokenize_source(path, "train", tokenizer, TruncationConfig(None), cache_dir=tmp_path / "c",
                                        progress=False)
    assert isinstance(again._store["arrays"]["prompt"], np.memmap) and again == first
    blob = pickle.dumps(again[3:])  # DataLoader workers / spawn: the view travels by folder, not by copy
    assert len(blob) < 2000 and pickle.loads(blob) == first[3:]


def test_a_bad_row_in_a_worker_names_file_row_and_line(tokenizer, tmp_path, monkeypatch):
    rows = _pairs(30)
    rows[17] = {"prompt": "x", "chosen": " y"}  # no rejected
    lines = [json.dumps(r) for r in rows]
    lines.insert(5, "")  # a blank line: row 17 is line 19
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(cache, "CHUNK_ROWS", 4)
    with pytest.raises(DataError, match=r"bad.jsonl: row 17: missing field 'rejected'"):
        cache.tokenize_source(str(path), "train", tokenizer, TruncationConfig(None), num_proc=2,
                              cache_dir=tmp_path / "c", progress=False)
    path.write_text("\n".join(lines[:8] + ["{not json"] + lines[8:]) + "\n")
    with pytest.raises(DataError, match=r"row 7 \(line 9\): invalid JSON"):
        cache.tokenize_source(str(path), "train", tokenizer, TruncationConfig(None), num_proc=2,
                              cache_dir=tmp_path / "c", progress=False)
    assert not [p for p in (tmp_path / "c").iterdir() if p.suffix != ".lock"]  # nothing half-written


@pytest.mark.parametrize("layout", ["plain", "prefix_shared", "packed_unshared"])
def test_views_equal_their_lists(tokenizer, tmp_path, layout):
    """Held-out split, units and lengths computed on the arrays equal the list-of-dicts computation."""
    path = _write(tmp_path / "d.jsonl", _pairs(40))
    dm = PreferenceDataModule(path, tokenizer, paired=False, kl_pairs=True, val_fraction=0.25, batch_size=3,
                              max_length=12, layout=layout, cache_dir=str(tmp_path / "c"), num_proc=1)
    dm.setup("fit")
    train, val = list(dm.train_rows), list(dm.val_rows)
    assert {r["index"] // 2 for r in train}.isdisjoint({r["index"] // 2 for r in val})
    every = sorted(train + val, key=lambda r: r["index"])
    assert [r["index"] for r in every] == sorted({r["index"] for r in every})  # a partition, row order kept
    assert dm.row_lengths(dm.train_rows) == dm.row_lengths(train)
    units = unit_positions(dm.train_rows.index, from_pairs=True, kl_pairs=True)
    assert [[train[p] for p in u] for u in units] == make_units(train, from_pairs=True, kl_pairs=True)
    batch = next(iter(dm.train_dataloader()))
    assert batch["num_sequences"] >= 4
