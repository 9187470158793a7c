"""scripts/benchmark.py: every contender trains on the same pairs, in the same batches and order (no timing here).

The slow end-to-end check runs the real driver with TRL on the tiny shape where a TRL python is named:

    TRL_PYTHON=/work/trlenv/bin/python pytest tests/test_benchmark.py -m slow
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import bench_lib  # noqa: E402
import benchmark  # noqa: E402


def test_timed_batches_are_a_seeded_partition():
    lengths = [(i * 37) % 101 + 5 for i in range(60)]
    for order in ("grouped", "shuffled"):
        batches = bench_lib.timed_batches(lengths, 4, 12, seed=3, order=order)
        flat = [p for b in batches for p in b]
        assert len(batches) == 12 and all(len(b) == 4 for b in batches) and len(set(flat)) == 48
        assert batches == bench_lib.timed_batches(lengths, 4, 12, seed=3, order=order)  # reproducible
        assert batches != bench_lib.timed_batches(lengths, 4, 12, seed=4, order=order)

    def padding(batches):
        return sum(max(lengths[p] for p in b) * len(b) - sum(lengths[p] for p in b) for b in batches)

    grouped = bench_lib.timed_batches(lengths, 4, 15, seed=0, order="grouped")
    shuffled = bench_lib.timed_batches(lengths, 4, 15, seed=0, order="shuffled")
    assert sorted(map(sorted, grouped)) != sorted(map(sorted, shuffled))
    assert padding(grouped) < padding(shuffled)
    with pytest.raises(ValueError, match="need 64 pairs"):
        bench_lib.timed_batches(lengths, 4, 16, seed=0)
    with pytest.raises(ValueError, match="order="):
        bench_lib.timed_batches(lengths, 4, 2, seed=0, order="sorted")


def _prepare(tmp_path: Path, default_data_path: str, tokenizer, n_batches: int) -> tuple[Path, list, list]:
    """rows.json as the driver writes it, from the embedded pairs (tokenized the way the runs tokenize)."""
    from dpo_lightning.data.formats import load_records, normalize
    from dpo_lightning.data.tokenize import TruncationConfig, tokenize_records

    records = normalize(load_records(default_data_path), where="default")[:40]
    rows, _ = tokenize_records(records, tokenizer, TruncationConfig(64))
    assert len(rows) == len(records)
    lengths = [len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows]
    batches = bench_lib.timed_batches(lengths, 4, n_batches, seed=1)
    ids = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"records": records, "rows": ids, "batches": batches}))
    with open(path.with_suffix(".jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path, records, batches


def test_ours_and_trls_feed_are_the_same_batch_list(tmp_path, default_data_path, tokenizer):
    """Our fixed batch sampler over the data module's rows and TRL's sequential feed give the list's batches."""
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    from dpo_lightning.data.datamodule import PreferenceDataModule

    path, records, batches = _prepare(tmp_path, default_data_path, tokenizer, 6)
    dm = PreferenceDataModule(str(path.with_suffix(".jsonl")), tokenizer, batch_size=4, max_length=64,
                              cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    dm.train_rows = dm.train_rows[::-1]  # the data module's own order does not matter
    ours = DataLoader(dm.train_rows, batch_sampler=bench_lib.our_batch_sampler(dm.train_rows, batches),
                      collate_fn=dm.collator())
    assert [b["index"].tolist() for b in ours] == batches
    # TRL: the records in the list's order, consumed sequentially (train_sampling_strategy="sequential")
    feed = bench_lib.feed_order(records, batches)
    trl = [list(b) for b in BatchSampler(SequentialSampler(feed), 4, drop_last=False)]
    assert [[feed[i] for i in b] for b in trl] == [[records[p] for p in b] for b in batches]
    with pytest.raises(RuntimeError, match="dropped by the data module"):
        bench_lib.our_batch_sampler(dm.train_rows[1:], batches)


def test_our_worker_times_the_list(tmp_path, default_data_path, tokenizer, tiny_path, monkeypatch):
    """The real worker (Lightning fit, 1 warm-up + 2 timed steps) reports the list's timed pairs and figures."""
    torch.set_num_threads(1)
    path, _, batches = _prepare(tmp_path, default_data_path, tokenizer, 3)
    for name in ("ours", "all_off"):
        args = benchmark.parse_args(["--worker", name, "--model-dir", str(tiny_path), "--rows", str(path),
                                     "--cache", str(tmp_path / f"c-{name}"), "--steps", "2", "--warmup", "1",
                                     "--max-length", "64", "--peak-flops", "1e10"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            benchmark.worker(args)
        r = json.loads(out.getvalue().split("BENCH_RESULT ")[-1])
        assert r["timed_ids"] == batches[1:] and r["steps"] == 2 and r["pairs"] == 8
        bench_lib.check_same_batches({name: r}, batches[1:])
        config = json.loads((tiny_path / "config.json").read_text())
        s = bench_lib.summarize(dict(r), bench_lib.model_shape(config), 1e10)
        t = s["timed_tokens"]
        assert t["pair_tokens"] == 2 * t["prompt"] + t["chosen"] + t["rejected"]
        # prefix sharing computes each prompt once; the plain layout (all_off, TRL's) twice
        assert t["processed_tokens"] == (t["unique_tokens"] if name == "ours" else t["pair_tokens"])
        assert 0 < s["useful_flop_utilisation"] and 0 < s["mfu_conventional"]
    with pytest.raises(RuntimeError, match="timed other pairs"):
        bench_lib.check_same_batches({"x": {"timed_ids": batches[:2]}}, batches[1:])


def test_driver_preparation_on_builtin_data(tmp_path):
    """Where ../shared/data is absent (a fresh GPU machine) the driver prepares the built-in pairs."""
    model_dir = benchmark.build_model_dir("tiny", "builtin")
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == benchmark.VOCAB
    data = benchmark.prepare_rows(model_dir, "builtin", 64, 4, 5, seed=0, order="grouped", out=tmp_path / "r.json")
    assert len(data["records"]) == 20 and sorted(p for b in data["batches"] for p in b) == list(range(20))
    assert json.loads((tmp_path / "r.json").read_text())["batches"] == data["batches"]
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 20


@pytest.mark.parametrize("shape", sorted(bench_lib.SHAPES))
def test_model_shapes_count_their_parameters(shape):
    """Every benchmark shape (the CUDA ~0.4B one included) builds, on the meta device, with the counted size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50257, **bench_lib.SHAPES[shape])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    counted = bench_lib.model_shape(cfg.to_dict())
    assert counted["params"] == sum(p.numel() for p in model.parameters())
    assert counted["matmul_params"] == counted["params"] - (0 if cfg.tie_word_embeddings else 50257 * cfg.hidden_size)
    if shape == "gpu05b":
        assert 0.35e9 < counted["params"] < 0.6e9


def test_cuda_mode_parses():
    args = benchmark.parse_args(["--device", "cuda", "--trl-python", "python"])
    assert args.shape == "gpu05b" and args.device == "cuda"
    cmd = benchmark.run_command("trl", args, Path("m"), Path("r.json"), Path("c"))
    assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[:1] == ["python"]
    assert benchmark.parse_args([]).shape == "small"


def test_ratios_and_figures():
    shape = {"H": 4, "V": 10, "layers": 1, "non_embedding_params": 100, "matmul_params": 140}
    run = {"name": "ours", "seconds": 2.0, "steps": 1, "pairs": 1, "batch_lengths": [[(3, 2, 1)]],
           "processed_tokens": 6, "positions": 8, "peak_rss_mb": 100}
    s = bench_lib.summarize(dict(run), shape, peak=1e4)
    assert s["tokens_per_s"] == (2 * 3 + 2 + 1) / 2 and s["padding_fraction"] == 0.25
    assert s["mfu_conventional"] == 8 * 140 * 6 / 2 / 1e4  # 6N policy + 2N live reference per processed token
    base = bench_lib.summarize(dict(run, name="trl", seconds=4.0, peak_rss_mb=400), shape, peak=1e4)
    r = bench_lib.ratios({"ours": s, "trl": base})["ours/trl"]
    assert r == {"pairs_per_s": 2.0, "tokens_per_s": 2.0, "peak_rss": 0.25}
    report = {"device": "cpu", "shape": "tiny", "data": "builtin", "batch_size": 1, "max_length": 8, "warmup": 1,
              "timed_steps": 1, "batches": "grouped", "model": {**shape, "params": 200},
              "runs": {"ours": s, "trl": base}, "ratios": {"ours/trl": r}}
    table = bench_lib.format_table(report)
    assert "useful-FLOP util" in table and "MFU (6N)" in table and "pairs/s 2.00x  tokens/s 2.00x" in table


@pytest.mark.subprocess
def test_gpu_check_script_parses_and_runs_the_benchmark_first():
    script = SCRIPTS / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert 'CHECKS=${CHECKS:-"bench ' in text and "scripts/benchmark.py" in text


@pytest.mark.slow
@pytest.mark.subprocess
def test_driver_with_trl_same_pairs(shared_data, tmp_path):
    """The whole driver on the tiny shape: ours and TRL time the same pairs (the driver checks it)."""
    trl_python = os.environ.get("TRL_PYTHON")
    if not trl_python:
        pytest.skip("set TRL_PYTHON to a python with TRL 1.16")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPTS.parent)}
    res = subprocess.run([sys.executable, str(SCRIPTS / "benchmark.py"), "--shape", "tiny", "--steps", "1",
                          "--warmup", "1", "--only", "ours", "trl", "--trl-python", trl_python,
                          "--peak-flops", "1e10"], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["runs"]["trl"]["tokenization_match"] == 1.0
    assert report["runs"]["ours"]["timed_tokens"]["pair_tokens"] == report["runs"]["trl"]["timed_tokens"][
        "pair_tokens"]
