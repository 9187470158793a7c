"""Files and folders written atomically get the modes a plain ``open`` / ``mkdir`` would: the umask is honoured
(``tempfile`` creates 0600 files and 0700 folders, which a teammate on a shared cluster cannot read)."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import pytest

from dpo_lightning.files.atomic import atomic_write_json, atomic_write_text, current_umask


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_writes_and_exports_honour_the_umask(tmp_path, tiny_path, mask, file_mode, dir_mode):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_lightning.data.validate import DataValidator
    from dpo_lightning.export import export_pretrained

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tok = AutoTokenizer.from_pretrained(tiny_path)
    with umask(mask):
        assert current_umask() == mask
        text = atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        summary = atomic_write_json(tmp_path / "job_summary.json", {"a": 1})
        DataValidator().write_report(tmp_path / "data_report.json")
        out = export_pretrained(model, tok, tmp_path / "export", records={"reference.json": {"name_or_path": "x"}})
    for path in (text, summary, tmp_path / "data_report.json", out / "model.safetensors", out / "reference.json",
                 out / "tokenizer.json", out / "config.json"):
        assert mode(path) == file_mode, path
    assert mode(out) == dir_mode


@pytest.mark.parametrize("mask, dir_mode", [(0o022, 0o755), (0o077, 0o700)])
def test_a_tokenization_cache_entry_honours_the_umask(tmp_path, tokenizer, mask, dir_mode):
    from dpo_lightning.data.cache import tokenize_cached
    from dpo_lightning.data.tokenize import TruncationConfig

    records = [{"prompt": "user : hi . assistant :", "chosen": " hello !", "rejected": " go away ."}]
    with umask(mask):
        rows, _ = tokenize_cached(records, tokenizer, TruncationConfig(32), num_proc=1, cache_dir=tmp_path / "c",
                                  progress=False)
    assert mode(rows.folder) == dir_mode
    assert all(mode(f) == dir_mode & 0o666 for f in rows.folder.iterdir())
