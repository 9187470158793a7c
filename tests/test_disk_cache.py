"""The one disk-cache utility (files/disk_cache.py): root, keys, the builders' lock, atomic entries."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from dpo_lightning.files import disk_cache


def test_root_from_cache_dir_env_or_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LIGHTNING_CACHE", str(tmp_path / "env"))
    assert disk_cache.cache_root() == tmp_path / "env"
    assert disk_cache.cache_root(None, "reference") == tmp_path / "env" / "reference"
    assert disk_cache.cache_root(tmp_path / "mine", "reference") == tmp_path / "mine" / "reference"
    monkeypatch.delenv("DPO_LIGHTNING_CACHE")
    assert disk_cache.cache_root() == Path.home() / ".cache" / "dpo_lightning"


def test_key_is_the_hash_of_version_and_parts():
    parts = ["abc", {"b": 1, "a": None}, True]
    expected = hashlib.sha256(json.dumps(["3", *parts], sort_keys=True, default=str).encode()).hexdigest()
    assert disk_cache.cache_key(*parts, version="3") == expected[:20]
    assert disk_cache.cache_key(*parts, version="3", length=24) == expected[:24]
    assert disk_cache.cache_key(*parts, version="4") != disk_cache.cache_key(*parts, version="3")


def test_publish_file_is_all_or_nothing(tmp_path):
    path = tmp_path / "x" / "entry.bin"
    disk_cache.publish_file(path, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert path.read_bytes() == b"new"

    def broken(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        disk_cache.publish_file(path, broken)
    assert path.read_bytes() == b"new" and sorted(p.name for p in path.parent.iterdir()) == ["entry.bin"]


def test_publish_folder_keeps_the_first_complete_entry(tmp_path):
    entry = tmp_path / "key"
    for content in ("first", "second"):
        tmp = disk_cache.staging_folder(entry)
        (tmp / "meta.json").write_text(content)
        disk_cache.publish_folder(tmp, entry, complete=lambda e: (e / "meta.json").exists())
    assert (entry / "meta.json").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["key"]
    tmp = disk_cache.staging_folder(tmp_path / "other")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "junk").write_text("")  # not a complete entry: the error stands
    with pytest.raises(OSError):
        disk_cache.publish_folder(tmp, tmp_path / "other", complete=lambda e: (e / "meta.json").exists())


def _hold(entry: str, ready, seconds: float) -> None:
    with disk_cache.file_lock(entry):
        ready.set()
        time.sleep(seconds)


def test_lock_makes_a_second_builder_wait(tmp_path, capsys):
    entry = tmp_path / "c" / "key"
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(entry), ready, 1.0))
    holder.start()
    try:
        assert ready.wait(60)
        t0 = time.perf_counter()
        with disk_cache.file_lock(entry, waiting="waiting for the other builder", poll=0.05):
            waited = time.perf_counter() - t0
    finally:
        holder.join(60)
    assert waited > 0.3 and "waiting for the other builder" in capsys.readouterr().out
    assert (tmp_path / "c" / "key.lock").exists()
