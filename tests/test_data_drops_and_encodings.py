"""Too many dropped rows stop a run before training (``data.max_drop_fraction``), with the counts by reason and
the override; files written by Windows tools (UTF-8 byte-order mark, CRLF line ends) read as the same rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dpo_lightning import PreferenceDataModule
from dpo_lightning.data.formats import DataError, load_records

ROWS = [{"prompt": f"user : describe the {c} {n} . assistant :", "chosen": f" the {c} {n} is lovely .",
         "rejected": f" the {c} {n} is ugly ."} for c in ("red", "blue", "green") for n in ("lamp", "kite", "boat")]


def _dm(path, tiny_path, tmp_path, **kw):
    return PreferenceDataModule(str(path), str(tiny_path), batch_size=2, cache_dir=str(tmp_path / "cache"), **kw)


def test_more_dropped_rows_than_max_drop_fraction_stop_before_training(tiny_path, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    report = tmp_path / "run" / "data_report.json"
    dm = _dm(path, tiny_path, tmp_path, max_length=8, report_path=str(report))  # every prompt is 8 tokens
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "validation dropped 9 of 9 rows (100%), more than data.max_drop_fraction=0.5" in msg or \
        "every row was dropped" in msg
    short = [{**r, "prompt": "user : hi . assistant :"} if k < 4 else r for k, r in enumerate(ROWS)]  # 4 rows fit
    path.write_text("".join(json.dumps(r) + "\n" for r in short))
    with pytest.raises(DataError, match=r"pairs.jsonl: validation dropped 5 of 9 rows \(56%\), more than "
                                        r"data.max_drop_fraction=0.5: prompt_fills_max_length 5; raise "
                                        r"data.max_length \(now 8\); or train on the 4 rows left with "
                                        r"data.max_drop_fraction=0.56"):
        _dm(path, tiny_path, tmp_path, max_length=8, report_path=str(report)).setup("fit")
    assert json.loads(report.read_text())["sources"][str(path)]["dropped"] == 5  # the report is written first
    dm = _dm(path, tiny_path, tmp_path, max_length=8, max_drop_fraction=0.56)
    dm.setup("fit")
    assert len(dm.train_rows) == 4
    with pytest.raises(ValueError, match=r"data.max_drop_fraction=1.5: must be in \[0, 1\]"):
        _dm(path, tiny_path, tmp_path, max_drop_fraction=1.5)


@pytest.mark.subprocess
def test_dpo_train_stops_with_one_line_and_a_non_zero_exit(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "dpo_lightning.train", "data.max_length=10", "logger=none",
                          "data.max_drop_fraction=0.2",
                          "print_config=false", f"paths.output_dir={tmp_path / 'run'}",
                          f"data.cache_dir={tmp_path / 'cache'}"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert "builtin:default_prefs: validation dropped" in errors[0] and "prompt_fills_max_length" in errors[0]
    assert "data.max_drop_fraction=" in errors[0] and "raise data.max_length (now 10)" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def _windows(text: str) -> bytes:
    return b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_byte_order_mark_and_crlf_line_ends_read_as_the_same_rows(tmp_path, suffix):
    plain, windows = tmp_path / f"plain{suffix}", tmp_path / f"windows{suffix}"
    if suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in ROWS)
    elif suffix == ".json":
        text = json.dumps(ROWS, indent=1) + "\n"
    else:
        text = "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in ROWS)
    plain.write_text(text)
    windows.write_bytes(_windows(text))
    assert load_records(windows) == load_records(plain) == ROWS


def test_a_windows_jsonl_file_trains_like_the_plain_one(tiny_path, tmp_path):
    text = "".join(json.dumps(r) + "\n" for r in ROWS)
    (tmp_path / "plain.jsonl").write_text(text)
    (tmp_path / "windows.jsonl").write_bytes(_windows(text))
    got = []
    for name in ("plain", "windows"):
        dm = _dm(tmp_path / f"{name}.jsonl", tiny_path, tmp_path, max_length=32)
        dm.setup("fit")  # streamed through the tokenizing workers (cache.py), not load_records
        got.append(list(dm.train_rows))
    assert got[0] == got[1] and len(got[0]) == len(ROWS)
