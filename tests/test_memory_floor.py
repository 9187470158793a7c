"""The memory floor of a run (docs/performance.md, "Memory"): heavy optional modules are imported only when
used, checkpoints stream to disk, the optimizer step has no parameter-sized temporaries, one-process
tokenization does without ``datasets``; and the measuring scripts work (slow: a real ``dpo-train``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from helpers import run_script

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("datasets", "pyarrow", "pandas", "tensorboard", "tensorboardX", "wandb", "scipy", "sklearn")


@pytest.mark.subprocess
def test_entry_points_and_cached_data_import_no_heavy_optional_module(default_data_path, tiny_path, tmp_path):
    """``dpo-train``'s module, the callbacks, and the data path of a run (read, tokenize in one process, cache
    hit) load none of them: ``datasets`` only tokenizes with ``num_proc`` > 1, loggers import their library
    when chosen, curves import matplotlib's pyplot when they draw."""
    res = run_script("data_path_imports.py", default_data_path, str(tiny_path), str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    loaded = set(json.loads(res.stdout.splitlines()[-1]))
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}, sorted(m for m in loaded if m.split(".")[0] in HEAVY)


def test_one_process_tokenization_writes_what_the_parallel_one_writes(default_data_path, tokenizer, tmp_path):
    import numpy as np

    from dpo_lightning.data.datamodule import tokenize_cached
    from dpo_lightning.data.formats import load_records, normalize, pairs_to_unpaired
    from dpo_lightning.data.tokenize import TruncationConfig

    records = normalize(load_records(default_data_path), where="default")[:48]
    cfg = TruncationConfig(max_length=24, max_prompt_length=20)  # some rows dropped, some truncated
    for n, recs in enumerate((records, pairs_to_unpaired(records[:16]))):
        one = tokenize_cached(recs, tokenizer, cfg, num_proc=1, cache_dir=tmp_path / f"one{n}", progress=False)
        two = tokenize_cached(recs, tokenizer, cfg, num_proc=2, cache_dir=tmp_path / f"two{n}", progress=False)
        assert one == two and one[0]
        entries = [next(p for p in (tmp_path / f"{d}{n}").iterdir() if p.is_dir()) for d in ("one", "two")]  # not the .lock
        assert entries[0].name == entries[1].name
        for f in entries[0].iterdir():  # the same entry, file for file
            other = entries[1] / f.name
            assert (np.array_equal(np.load(f), np.load(other)) if f.suffix == ".npy"
                    else f.read_bytes() == other.read_bytes()), f.name


def test_the_tokenizer_is_released_after_setup_and_reloaded_on_demand(default_data_path, tiny_path, tmp_path):
    from dpo_lightning.data.datamodule import PreferenceDataModule
    from dpo_lightning.training.memory import release_free_memory

    dm = PreferenceDataModule(default_data_path, str(tiny_path), cache_dir=str(tmp_path), max_length=64, batch_size=4)
    dm.release_tokenizer()  # before setup: nothing to release yet
    dm.setup("fit")
    loaded = dm.tokenizer
    dm.release_tokenizer()
    assert dm._tokenizer == str(tiny_path) and dm.pad_token_id == loaded.pad_token_id
    batch = next(iter(dm.train_dataloader()))  # collating needs only the pad id
    assert dm._tokenizer == str(tiny_path) and batch["index"].numel() == 4
    assert dm.tokenizer.get_vocab() == loaded.get_vocab()  # the export reloads it
    given = PreferenceDataModule(default_data_path, loaded, cache_dir=str(tmp_path), max_length=64)
    given.setup("fit")
    given.release_tokenizer()
    assert given.tokenizer is loaded  # an object the caller passed cannot be reloaded: kept
    assert release_free_memory() is sys.platform.startswith("linux")


def test_checkpoints_stream_to_disk_atomically(tmp_path):
    """No in-memory copy of the checkpoint (Lightning's TorchCheckpointIO buffers all of it first)."""
    from dpo_lightning.files.atomic import AtomicCheckpointIO

    weights = torch.randn(4 * 2**20)  # 16 MiB
    ckpt = {"state_dict": {"w": weights}, "optimizer_states": [{"exp_avg": weights * 2}], "global_step": 3}
    path = tmp_path / "checkpoints" / "last.ckpt"
    tracemalloc.start()
    AtomicCheckpointIO().save_checkpoint(ckpt, path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB of Python memory while saving 32 MiB of tensors"
    back = AtomicCheckpointIO().load_checkpoint(path)
    assert torch.equal(back["state_dict"]["w"], weights) and back["global_step"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # the temporary file was renamed

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        AtomicCheckpointIO().save_checkpoint({"x": Unpicklable()}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # old file kept, no temporary left
    assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 3


def test_adamw_is_fused_by_default_and_matches_the_unfused_update():
    from dpo_lightning.training.optim import OptimizerSpec

    torch.manual_seed(0)
    init = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(4)]
    finals = {}
    for kwargs in ({}, {"fused": False}, {"foreach": False}):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = OptimizerSpec("AdamW", lr=1e-2, weight_decay=0.1, kwargs=dict(kwargs)).build(params)
        assert opt.defaults["fused"] is (True if not kwargs else None if "foreach" in kwargs else False)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        finals[str(kwargs)] = [p.detach() for p in params]
    for name, ps in finals.items():
        for a, b in zip(ps, finals["{}"]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
    sgd = OptimizerSpec("SGD", lr=0.1).build([torch.nn.Parameter(torch.zeros(2))])
    assert not sgd.defaults.get("fused")
    with pytest.raises(ValueError, match="empty parameter list"):
        OptimizerSpec("AdamW").build([])


@pytest.mark.slow
@pytest.mark.subprocess
def test_memory_floor_script_measures_a_real_dpo_train(shared_data):
    """scripts/memory_floor.py on the tiny shape: a user's dpo-train run (warm cache) and its phase account."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "memory_floor.py"), "--shape", "tiny",
                          "--steps", "2", "--max-length", "64", "--only", "ours_warm", "--account"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO),
                                                                "OMP_NUM_THREADS": "1"}, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["runs"]["ours_warm"]["peak_rss_mb"] > 200
    phases = [p["phase"] for p in report["account"]["phases"]]
    assert phases[1].startswith("imports") and any(p.startswith("step 1: backward") for p in phases)
    assert not report["account"]["modules"]["datasets"]  # a cache hit
    peak = max(p["peak_mb"] for p in report["account"]["phases"])
    assert abs(peak - report["runs"]["ours_account"]["peak_rss_mb"]) < 0.1 * peak
