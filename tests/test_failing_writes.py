"""A write that fails (a full disk, a read-only folder: simulated, the tests run as root) leaves the previous
file or folder whole and no temporary file behind, and stops with one ``WriteError`` naming the target and
the OS error; a cache entry whose writing failed (or was cut short) is never read, the next run rebuilds it."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from dpo_lightning.files.atomic import AtomicCheckpointIO, WriteError, atomic_write_json


def _full(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _read_only(*_a, **_k):
    raise OSError(errno.EROFS, "Read-only file system")


def _half_then_full(obj, f, *a, **k):
    """``torch.save`` onto a disk that fills up half-way: some bytes land in the file, then ENOSPC."""
    Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
    _full()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("fail", ["torch.save", "os.replace"])
def test_a_failing_checkpoint_save_keeps_the_previous_last_ckpt(tmp_path, monkeypatch, fail):
    io = AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(4.0)}, "global_step": 1}, last)
    before = last.read_bytes()
    if fail == "torch.save":
        monkeypatch.setattr(torch, "save", _half_then_full)
    else:
        monkeypatch.setattr(os, "replace", _read_only)
    with pytest.raises(WriteError) as err:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(4)}, "global_step": 2}, last)
    monkeypatch.undo()
    reason = "No space left on device (ENOSPC)" if fail == "torch.save" else "Read-only file system (EROFS)"
    assert str(err.value) == f"cannot write {last}: {reason}"
    assert err.value.path == str(last) and err.value.errno in (errno.ENOSPC, errno.EROFS)
    assert last.read_bytes() == before and _files(last.parent) == ["last.ckpt"]  # no temp file behind
    assert io.load_checkpoint(last)["global_step"] == 1


def test_a_failing_sharded_save_keeps_the_previous_checkpoint_folder(tmp_path):
    """``AtomicFolderSave`` (FSDP / DeepSpeed checkpoints are folders): a shard write that fails removes the
    temp folder and leaves the previous folder whole."""
    from dpo_lightning.files.atomic import AtomicFolderSave

    class _Base:  # a one-rank strategy writing one file per "rank" into the folder
        is_global_zero = True
        fail = False

        def broadcast(self, x):
            return x

        def barrier(self, name=None):
            pass

        def save_checkpoint(self, checkpoint, filepath, storage_options=None):
            Path(filepath).mkdir(parents=True, exist_ok=True)
            (Path(filepath) / "shard0.pt").write_bytes(json.dumps(checkpoint).encode())
            if self.fail:
                _full()

    class _Strategy(AtomicFolderSave, _Base):
        pass

    strategy, last = _Strategy(), tmp_path / "last.ckpt"
    strategy.save_checkpoint({"step": 1}, last)
    strategy.fail = True
    with pytest.raises(WriteError, match=f"cannot write {last}: No space left on device"):
        strategy.save_checkpoint({"step": 2}, last)
    assert _files(tmp_path) == ["last.ckpt"]  # no .last.ckpt.tmp, no .last.ckpt.old
    assert json.loads((last / "shard0.pt").read_text()) == {"step": 1}


@pytest.mark.parametrize("fail", ["save_pretrained", "rename"])
def test_a_failing_export_keeps_the_previous_export_whole(tmp_path, monkeypatch, tiny_path, fail):
    from transformers import AutoModelForCausalLM

    from dpo_lightning.export import export_pretrained

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    out = export_pretrained(model, None, tmp_path / "export", records={"reference.json": {"mode": "copy"}})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if fail == "save_pretrained":
        def half_then_full(self, folder, **kw):
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            _full()
        monkeypatch.setattr(type(model), "save_pretrained", half_then_full)
    else:  # the new folder is written, then renaming it in fails (the old one is already aside)
        real = Path.rename

        def rename(self, target):
            if Path(target) == out and self.name.startswith(".export.") and not self.name.endswith(".old"):
                _read_only()
            return real(self, target)
        monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(WriteError, match=f"^cannot write {out}: "):
        export_pretrained(model, None, out, records={"reference.json": {"mode": "none"}})
    monkeypatch.undo()
    assert _files(tmp_path) == ["export"]  # no temp folder, no aside copy
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    AutoModelForCausalLM.from_pretrained(out)


def test_a_failing_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = atomic_write_json(tmp_path / "data_report.json", {"rows": 1})
    monkeypatch.setattr(os, "replace", _full)
    with pytest.raises(WriteError, match=f"cannot write {path}: No space left on device"):
        atomic_write_json(path, {"rows": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"rows": 1} and _files(tmp_path) == ["data_report.json"]


def _pairs(n):
    return [{"prompt": f"user : say {i} . assistant :", "chosen": f" yes {'!' * (1 + i % 3)}",
             "rejected": f" no {'.' * (1 + i % 4)}"} for i in range(n)]


@pytest.mark.parametrize("at", ["chunk", "publish"])
def test_a_tokenization_cache_entry_that_failed_mid_write_is_never_read(tokenizer, tmp_path, monkeypatch, at):
    """The disk fills up while a chunk is written (or while the entry is renamed into place): no entry
    exists afterwards, only the lock file; the next run builds it and gets the same rows as a clean build."""
    import numpy as np

    from dpo_lightning.data import cache, store
    from dpo_lightning.data.tokenize import TruncationConfig

    records, cfg, root = _pairs(11), TruncationConfig(max_length=16), tmp_path / "c"
    expected, _ = cache.tokenize_cached(records, tokenizer, cfg, num_proc=1, cache_dir=tmp_path / "clean",
                                        progress=False)
    monkeypatch.setattr(cache, "CHUNK_ROWS", 4)
    if at == "chunk":  # the second chunk's ids hit a full disk
        real, calls = np.ndarray.tofile, []

        class _Ids(np.ndarray):
            def tofile(self, fh, *a, **k):
                calls.append(1)
                if len(calls) > 3:
                    _full()
                return real(self, fh, *a, **k)
        real_add = store.StoreWriter.add
        monkeypatch.setattr(store.StoreWriter, "add", lambda self, chunk: real_add(
            self, {**chunk, **{f: chunk[f].view(_Ids) for f in store.FIELDS}}))
    else:
        monkeypatch.setattr(os, "rename", _full)
    with pytest.raises(WriteError, match="cannot write .*: No space left on device \\(ENOSPC\\)") as err:
        cache.tokenize_cached(records, tokenizer, cfg, num_proc=1, cache_dir=root, progress=False)
    monkeypatch.undo()
    entry = Path(err.value.path)
    assert [p.suffix for p in entry.parent.iterdir()] == [".lock"]  # no entry, no .tmp-* staging folder
    rows, _ = cache.tokenize_cached(records, tokenizer, cfg, num_proc=1, cache_dir=root, progress=False)
    assert list(rows) == list(expected)


def test_a_staging_folder_or_a_cut_short_entry_is_never_read(tokenizer, tmp_path):
    """A crash mid-write leaves a ``.tmp-*`` staging folder (never looked at: entries are found by name); a
    file cut short inside an entry makes it no entry: it is rebuilt, with the same rows."""
    from dpo_lightning.data import cache
    from dpo_lightning.data.store import load_store
    from dpo_lightning.data.tokenize import TruncationConfig

    records, cfg, root = _pairs(9), TruncationConfig(max_length=16), tmp_path / "c"
    first, _ = cache.tokenize_cached(records, tokenizer, cfg, num_proc=1, cache_dir=root, progress=False)
    expected = list(first)
    entry = first.folder
    staging = entry.with_name(".tmp-crashed")
    staging.mkdir()
    (staging / "prompt.raw").write_bytes(b"\0" * 7)  # what a killed build leaves
    ids = entry / "a.npy"
    ids.write_bytes(ids.read_bytes()[:-8])  # the last two ids cut off
    assert load_store(entry) is None
    rows, _ = cache.tokenize_cached(records, tokenizer, cfg, num_proc=1, cache_dir=root, progress=False)
    assert list(rows) == expected and load_store(entry) is not None


def test_a_reference_cache_file_that_failed_mid_write_is_never_read(tokenizer, tiny_path, tmp_path, monkeypatch):
    from helpers import rows_of

    from dpo_lightning.data.collate import PreferenceCollator
    from dpo_lightning.models.hf import ModelSpec, load_causal_lm
    from dpo_lightning.reference import cache as ref_cache

    policy = load_causal_lm(ModelSpec(str(tiny_path)))
    rows = rows_of(tokenizer)
    collator = PreferenceCollator(tokenizer.pad_token_id, layout="prefix_shared")
    kw = dict(weights="w", tokenizer="t", truncation={"max_length": 64}, cache_dir=tmp_path)
    import safetensors.torch as st

    real_save = st.save_file

    def half_then_full(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(os.path.getsize(filename) // 2)
        _full()
    monkeypatch.setattr(st, "save_file", half_then_full)
    with pytest.raises(WriteError, match=r"cannot write .*\.safetensors: No space left on device \(ENOSPC\)"):
        ref_cache.cached_reference_logps(rows, policy, collator, **kw)
    monkeypatch.undo()
    folder = tmp_path / "reference"
    assert [p.suffix for p in folder.iterdir()] == [".lock"]  # no file, no .tmp-*
    values, info = ref_cache.cached_reference_logps(rows, policy, collator, **kw)
    assert not info["hit"]
    path = Path(info["path"])
    path.write_bytes(path.read_bytes()[:-16])  # a file cut short (by hand) is a miss, recomputed
    again, info = ref_cache.cached_reference_logps(rows, policy, collator, **kw)
    assert not info["hit"] and all(torch.equal(values[k], again[k]) for k in values)


def test_dpo_train_whose_checkpoint_write_fails_prints_one_error_line(tmp_path, monkeypatch, capsys, one_thread):
    """Inside Lightning's fit: the checkpoint's ``WriteError`` reaches the entry point, which prints one
    ``error: cannot write <path>: ...`` line and exits with status 2 (no traceback)."""
    from dpo_lightning.cli.locate import compose
    from dpo_lightning.train import run_single

    out = tmp_path / "run"
    cfg = compose("train", [f"paths.output_dir={out}", "logger=none", "trainer.max_steps=2",
                            "trainer.val_check_interval=2", "data.batch_size=4", "print_config=false",
                            "~callbacks.throughput", "~callbacks.training_curves"])
    monkeypatch.setattr(torch, "save", _half_then_full)
    with pytest.raises(SystemExit) as exit_:
        run_single(cfg)
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: cannot write {out / 'checkpoints'}/")
    assert errors[0].endswith(".ckpt: No space left on device (ENOSPC)")
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp file
