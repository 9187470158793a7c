"""Training-throughput benchmark: dpo_lightning with every optimization on, the same with every one off, and
TRL 1.16's DPOTrainer, on the same model, data and settings, each in its own process. Prints one JSON.

    python scripts/benchmark.py                        # ours (live and precomputed reference) vs all-off
    python scripts/benchmark.py --trl-python /work/trlenv/bin/python   # ... and vs TRL, back to back
    python scripts/benchmark.py --only ours --steps 20 -o data.layout=packed   # one config, Hydra overrides

What runs (every configuration in a fresh subprocess, so its peak RSS is its own):

    ours             the defaults: prefix-shared layout, length-grouped batches, completion-only chunked LM head
                     with the softmax kept for backward, live reference (a frozen copy)
    ours_precompute  the same with ``reference.precompute=true`` (reference log-probs computed once before
                     training into a fresh cache; that one-time pass is reported as ``precompute_seconds``)
    all_off          plain layout (TRL's), no length grouping, ``engine.full_logits=true`` (the model's own LM
                     head over every position, full log-softmax), live reference
    trl, trl_precompute   scripts/benchmark_trl.py under ``--trl-python`` (TRL is not our dependency)

Model: a Llama built from a config (hidden 256, 4 layers, 8 heads and 8 KV heads, intermediate size 1024 =
4 x hidden, vocab 50,257 = the GPT-2 tokenizer, untied embeddings: 29.9M parameters, 4.2M of them outside the
embedding and LM head), saved with ``save_pretrained`` and loaded back with ``from_pretrained`` by every run.
Data: the 1,500 HH-RLHF pairs of ../shared/data, tokenized once by dpo_lightning (max_length 256, keep_start;
rows whose prompt fills max_length are dropped, as TRL 1.16 drops them); TRL tokenizes the same text and the
TRL run reports whether its ids match ours. Each run trains on the same seeded subset of
``4 * (warmup + steps)`` pairs, one epoch; the first ``--warmup`` steps are excluded from the timing.
Settings: fp32, CPU, 4 pairs per step, sigmoid loss beta 0.1, fused AdamW lr 1e-6, linear schedule,
gradient clipping 1.0, no gradient checkpointing. On CUDA (``--device cuda``): bf16, a ~0.5B-shaped Llama
(hidden 1024, 24 layers, 16 heads, intermediate 2816, same vocabulary), peak = the device's dense bf16 spec.

Figures (per run, then ``ratios``):

    pairs_per_s          pairs trained per second over the timed steps (forward, backward, optimizer, data)
    tokens_per_s         non-pad tokens of the pairs' two sequences (2 x prompt + chosen + rejected) per
                         second: the same numerator for every layout and for TRL
    padding_fraction     padded / all positions the model ran over (our runs; TRL pads like ``plain``)
    peak_rss_mb          ru_maxrss of the run's process (CPU); ``peak_gpu_mb`` max_memory_allocated (CUDA)
    mfu                  useful FLOPs / seconds / peak. Useful FLOPs are those of the minimal computation of
                         the pairs, whatever a run actually computes:
                           policy  6 N (P + C + R)  +  3 A  +  6 H V (C + R)      (forward + backward)
                           reference, unless precomputed:  2 N (P + C + R)  +  A  +  2 H V (C + R)
                         N non-embedding parameters, H hidden size, V vocabulary, P/C/R prompt/chosen/rejected
                         tokens (the prompt counted once), A = 4 x layers x H x (sum over tokens of the number
                         of keys each attends to, for the prompt-once tree) the forward attention matmuls.
                         Embedding lookups, norms, activations, softmax, optimizer: not counted.
                         CPU peak: the best of 2048 x 2048 fp32 matmuls, measured in the same process with the
                         same torch threads; CUDA peak: the device's dense bf16 figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CPU_MODEL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8)
GPU_MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16)
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


# ------------------------------------------------------------------ preparation (driver)
def cache_dir() -> Path:
    return Path(os.environ.get("DPO_LIGHTNING_CACHE", Path.home() / ".cache" / "dpo_lightning"))


def build_model_dir(device: str) -> Path:
    """The benchmark model + GPT-2 tokenizer, saved once with save_pretrained (seeded)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shape = GPU_MODEL if device == "cuda" else CPU_MODEL
    name = "bench-llama-" + "-".join(f"{k[:3]}{v}" for k, v in shape.items())
    target = cache_dir() / "bench" / name
    if (target / "config.json").exists():
        return target
    tok = AutoTokenizer.from_pretrained(SHARED / "gpt2-tokenizer")
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    tmp = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:
        pass
    return target


def prepare_rows(model_dir: Path, max_length: int, n_pairs: int, seed: int, out: Path) -> dict:
    """Tokenize the HH-RLHF pairs with dpo_lightning; write a seeded subset (records + ids) for every run."""
    from dpo_lightning.data.formats import load_records, normalize
    from dpo_lightning.data.tokenize import TruncationConfig, tokenize_records
    from dpo_lightning.models.hf import ModelSpec, load_tokenizer

    tok = load_tokenizer(ModelSpec(str(model_dir)))
    records = normalize(load_records(SHARED / "hh-rlhf-harmless-base-test.jsonl.gz"), where="hh-rlhf")
    rows, dropped = tokenize_records(records, tok, TruncationConfig(max_length))
    rnd = random.Random(seed)
    pick = sorted(rnd.sample(range(len(rows)), min(n_pairs, len(rows))))
    rows = [rows[i] for i in pick]
    subset = [records[r["index"]] for r in rows]
    data = {"records": subset, "rows": [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                        for r in rows], "dropped": dict(dropped)}
    out.write_text(json.dumps(data))
    with open(out.with_suffix(".jsonl"), "w") as f:
        for rec in subset:
            f.write(json.dumps(rec) + "\n")
    return data


def warm_tokenization(model_dir: Path, rows_jsonl: Path, max_length: int, folder: Path) -> Path:
    """Fill dpo_lightning's tokenization cache for the runs (what any second run of the same data finds)."""
    from dpo_lightning.data.datamodule import tokenize_cached
    from dpo_lightning.data.formats import load_records, normalize
    from dpo_lightning.data.tokenize import TruncationConfig
    from dpo_lightning.models.hf import ModelSpec, load_tokenizer

    tok = load_tokenizer(ModelSpec(str(model_dir)))
    records = normalize(load_records(str(rows_jsonl)), where=str(rows_jsonl))
    tokenize_cached(records, tok, TruncationConfig(max_length), cache_dir=folder)
    return next(folder.glob("*.json"))


# ------------------------------------------------------------------ FLOPs
def model_shape(model_dir: Path) -> dict:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    H, V, nl, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or H // heads
    per_layer = H * heads * hd + 2 * H * kv * hd + heads * hd * H + 3 * H * inter + 2 * H
    return {"H": H, "V": V, "layers": nl, "non_embedding_params": nl * per_layer + H,
            "params": nl * per_layer + H + 2 * V * H}


def useful_flops(pairs: list[tuple[int, int, int]], shape: dict, reference: bool) -> float:
    """The minimal computation of these pairs (see the module docstring)."""
    N, H, V, nl = shape["non_embedding_params"], shape["H"], shape["V"], shape["layers"]
    total = 0.0
    for P, C, R in pairs:
        tokens = P + C + R
        ctx = P * (P + 1) / 2 + C * P + C * (C + 1) / 2 + R * P + R * (R + 1) / 2
        attn = 4 * nl * H * ctx
        total += 6 * N * tokens + 3 * attn + 6 * H * V * (C + R)
        if reference:
            total += 2 * N * tokens + attn + 2 * H * V * (C + R)
    return total


def matmul_peak_flops(n: int = 2048, reps: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best


# ------------------------------------------------------------------ one run (worker process)
RUNS = {
    "ours": [],
    "ours_precompute": ["reference.precompute=true"],
    "all_off": ["data.layout=plain", "data.group_by_length=false", "engine.full_logits=true",
                "engine.softmax_cache_mb=0"],
}


def worker(args) -> None:
    import lightning as L
    import torch

    from dpo_lightning.configs import compose
    from dpo_lightning.train import build

    peak = matmul_peak_flops() if args.device == "cpu" else None
    steps = args.warmup + args.steps
    overrides = [
        "model=hf", f"model.name_or_path={args.model_dir}", "model.attn_implementation=sdpa",
        f"model.dtype={'bfloat16' if args.device == 'cuda' else 'float32'}",
        f"data.path={args.rows_jsonl}", "data.val_fraction=0", f"data.batch_size={args.batch_size}",
        f"data.max_length={args.max_length}", "data.num_proc=1", f"data.cache_dir={args.cache}",
        "loss=sigmoid", "loss.beta=0.1", "optimizer.lr=1e-6", "+optimizer.kwargs.fused=true",
        "scheduler=linear", "logger=none", "callbacks=none", f"seed={args.seed}", "peft=none",
    ]
    cfg = compose("train", overrides)
    if "engine" not in cfg:  # the group exists; train.yaml may not list it among its defaults yet
        overrides.append("+engine=default")
    cfg = compose("train", overrides + RUNS.get(args.worker, []) + list(args.override or []))
    objs = build(cfg, with_trainer=False)
    module, dm = objs["module"], objs["datamodule"]
    dm.setup("fit")
    by_index = {r["index"]: r for r in dm.train_rows}

    class Timer(L.Callback):
        def __init__(self):
            self.starts, self.ends, self.lengths, self.real, self.positions = [], [], [], 0, 0
            self.fit_start = time.perf_counter()
            self.train_start = None

        def on_train_start(self, trainer, pl_module):
            self.train_start = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            rows = [by_index[int(i)] for i in batch["index"]]
            self.lengths.append([(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"]))
                                 for r in rows])
            if len(self.ends) > args.warmup:
                self.real += int(batch["attention_mask"].sum())
                self.positions += batch["input_ids"].numel()

    timer = Timer()
    trainer = L.Trainer(max_steps=steps, accelerator=args.device, devices=1,
                        precision="bf16-true" if args.device == "cuda" else cfg.trainer.precision,
                        gradient_clip_val=cfg.trainer.gradient_clip_val, logger=False, callbacks=[timer],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=10)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=dm)
    if args.device == "cpu":  # the peak is a property of the machine: keep the better of two measurements
        peak = max(peak, matmul_peak_flops())
    w = args.warmup
    result = {
        "name": args.worker, "overrides": RUNS.get(args.worker, []) + list(args.override or []),
        "steps": len(timer.ends) - w, "seconds": timer.ends[-1] - timer.starts[w],
        "pairs": sum(len(b) for b in timer.lengths[w:]), "batch_lengths": timer.lengths[w:],
        "padding_fraction": 1 - timer.real / max(timer.positions, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "matmul_peak_flops": peak,
        "precompute_seconds": (timer.train_start - timer.fit_start) if "precompute" in args.worker else None,
        "layout": dm.layout, "group_by_length": dm.group_by_length,
        "torch_threads": torch.get_num_threads(),
        "step_seconds": [e - s for s, e in zip(timer.starts[w:], timer.ends[w:])],
        "load_average_after": os.getloadavg(),
    }
    if args.device == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        name = torch.cuda.get_device_name()
        result["device_name"] = name
        result["peak_flops"] = args.peak_flops or next((v for k, v in BF16_PEAK.items() if k in name), None)
    print("BENCH_RESULT " + json.dumps(result))


# ------------------------------------------------------------------ driver
def run_subprocess(cmd: list[str], env: dict | None = None, timeout: float = 1800) -> dict:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    out = json.loads(line[len("BENCH_RESULT "):])
    out["process_seconds"] = time.perf_counter() - t
    return out


def summarize(r: dict, shape: dict, device: str, cpu_peak: float | None) -> dict:
    pairs = [tuple(p) for b in r.pop("batch_lengths") for p in b]
    reference = not r["name"].endswith("precompute")
    flops = useful_flops(pairs, shape, reference)
    peak = r.get("peak_flops") if device == "cuda" else cpu_peak
    r["pairs_per_s"] = r["pairs"] / r["seconds"]
    r["tokens_per_s"] = sum(2 * P + C + R for P, C, R in pairs) / r["seconds"]
    r["useful_tflops_per_step"] = flops / max(r["steps"], 1) / 1e12
    r["useful_flops_per_s"] = flops / r["seconds"]
    r["mfu"] = flops / r["seconds"] / peak if peak else None
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps of our optimized runs")
    p.add_argument("--all-off-steps", type=int, default=8, help="timed steps of the all-off run (it is slow)")
    p.add_argument("--trl-steps", type=int, default=16, help="timed steps of the TRL runs")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--peak-flops", type=float, default=None, help="CUDA: override the device's bf16 peak")
    p.add_argument("--only", nargs="*", default=None,
                   help="runs to do: ours ours_precompute all_off trl trl_precompute (default: all available)")
    p.add_argument("--trl-python", default=None, help="a python with TRL 1.16 (e.g. /work/trlenv/bin/python)")
    p.add_argument("-o", "--override", action="append", help="Hydra override for our runs (repeatable)")
    p.add_argument("--repeats", type=int, default=1, help="run every configuration this many times (best kept)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows-jsonl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not (SHARED / "gpt2-tokenizer" / "tokenizer.json").exists():
        sys.exit(f"the benchmark needs ../shared/data (looked in {SHARED})")

    model_dir = build_model_dir(args.device)
    work = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    n_pairs = args.batch_size * (args.warmup + max(args.steps, args.all_off_steps, args.trl_steps))
    rows_json = work / "rows.json"
    prepare_rows(model_dir, args.max_length, n_pairs, args.seed, rows_json)
    shape = model_shape(model_dir)
    warm = warm_tokenization(model_dir, rows_json.with_suffix(".jsonl"), args.max_length, work / "tokenized")
    runs = args.only or (["ours", "ours_precompute", "all_off"]
                         + (["trl", "trl_precompute"] if args.trl_python else []))
    results: dict[str, dict] = {}
    raw: list[dict] = []
    for rep in range(args.repeats):
        for name in runs:
            if name.startswith("trl"):
                if not args.trl_python:
                    sys.exit("--trl-python is needed for the TRL runs")
                cmd = [args.trl_python, str(REPO / "scripts" / "benchmark_trl.py"), "--model-dir", str(model_dir),
                       "--rows", str(rows_json), "--steps", str(args.trl_steps), "--warmup", str(args.warmup),
                       "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                       "--seed", str(args.seed)] + (["--precompute"] if name == "trl_precompute" else [])
            else:
                steps = args.all_off_steps if name == "all_off" else args.steps
                run_cache = work / f"cache-{name}-{rep}"  # fresh reference cache, warm tokenization cache
                run_cache.mkdir()
                shutil.copy(warm, run_cache / warm.name)
                cmd = [sys.executable, __file__, "--worker", name, "--model-dir", str(model_dir),
                       "--rows-jsonl", str(rows_json.with_suffix(".jsonl")), "--steps", str(steps),
                       "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                       "--max-length", str(args.max_length), "--seed", str(args.seed), "--device", args.device,
                       "--cache", str(run_cache)]
                if args.peak_flops:
                    cmd += ["--peak-flops", str(args.peak_flops)]
                for o in args.override or []:
                    cmd += ["-o", o]
            r = run_subprocess(cmd)
            r["repeat"] = rep
            raw.append(r)
            print(f"[benchmark] {name}: {r['pairs'] / r['seconds']:.2f} pairs/s, {r['peak_rss_mb']:.0f} MB RSS",
                  file=sys.stderr)
    # the CPU matmul peak is a property of the machine: the best measurement of any run (each run measures
    # it before and after training, in its own process, with the same torch threads)
    cpu_peak = max((r["matmul_peak_flops"] or 0 for r in raw), default=0) or None
    for r in raw:
        r = summarize(r, shape, args.device, cpu_peak)
        name = r["name"]
        if name not in results or r["pairs_per_s"] > results[name]["pairs_per_s"]:
            results[name] = r  # best of the repeats (other processes on a shared machine only slow runs down)

    def ratio(a, b, key, inverse=False):
        if a in results and b in results and results[b][key]:
            x = results[a][key] / results[b][key]
            return 1 / x if inverse else x
        return None

    ratios = {}
    for ours in ("ours", "ours_precompute"):
        for base in ("all_off", "trl", "trl_precompute"):
            if ours in results and base in results:
                ratios[f"{ours}/{base}"] = {
                    "pairs_per_s": ratio(ours, base, "pairs_per_s"),
                    "tokens_per_s": ratio(ours, base, "tokens_per_s"),
                    "peak_rss": ratio(ours, base, "peak_rss_mb"),
                }
    import torch

    report = {"device": args.device, "model": {"dir": str(model_dir), **shape}, "pairs_in_subset": n_pairs,
              "batch_size": args.batch_size, "max_length": args.max_length, "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "cpu_matmul_peak_flops": cpu_peak, "repeats": args.repeats,
              "runs": results, "ratios": ratios}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
