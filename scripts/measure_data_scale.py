"""Measure ``PreferenceDataModule.setup`` at scale: time and peak RSS on a cold cache and on a cache hit.

    python scripts/make_large_data.py --pairs 100000 --out /tmp/hh-100k.jsonl
    python scripts/measure_data_scale.py /tmp/hh-1k.jsonl /tmp/hh-10k.jsonl /tmp/hh-100k.jsonl

Each measurement runs in a fresh process (so peak RSS is that of one user process: imports, tokenizer,
setup): the first with an empty cache folder (cold: read, tokenize, write), the second reusing it (hit).
Prints one JSON line per run and a markdown table; ``uptime``'s load average is printed beside the times
because they depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / ".." / "shared" / "data" / "gpt2-tokenizer"


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


def child(args) -> None:
    from dpo_lightning import PreferenceDataModule

    dm = PreferenceDataModule(args.data, args.tokenizer, max_length=args.max_length, num_proc=args.num_proc,
                              cache_dir=args.cache)
    dm.tokenizer  # noqa: B018 - load it before the clock starts
    base = rss_mb()
    t0 = time.perf_counter()
    dm.setup("fit")
    seconds = time.perf_counter() - t0
    rows = dm.train_rows
    tokens = int(sum(rows.lengths(f).sum() for f in ("prompt", "a", "b")))
    batch = next(iter(dm.train_dataloader()))  # the rows are usable: one batch through sampler and collator
    print(json.dumps({
        "pairs_in": sum(1 for line in open(args.data) if line.strip()), "rows": len(rows), "tokens": tokens,
        "seconds": round(seconds, 2), "rss_after_imports_mb": round(base, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_workers_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "rss_end_mb": round(rss_mb(), 1), "batch_rows": int(batch["num_sequences"]),
    }))


def run(data: str, cache: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--data", data, "--cache", str(cache), "--tokenizer", args.tokenizer,
           "--max-length", str(args.max_length)] + (["--num-proc", str(args.num_proc)] if args.num_proc else [])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["cache_mb"] = round(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20, 1)
    result["load"] = Path("/proc/loadavg").read_text().split()[0]
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="JSONL preference files (scripts/make_large_data.py)")
    ap.add_argument("--tokenizer", default=str(TOKENIZER))
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--num-proc", type=int, default=None, help="tokenizing processes (default: every core)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    table = ["| pairs | tokens | cold setup s (load) | hit setup s (load) | peak RSS cold MB (workers) | "
             "peak RSS hit MB | RSS after imports MB | cache MB |", "|---|---|---|---|---|---|---|---|"]
    for data in args.files:
        cache = Path(tempfile.mkdtemp(prefix="dpo-scale-"))
        try:
            cold = run(data, cache, args)
            hit = run(data, cache, args)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        print(json.dumps({"data": data, "cold": cold, "hit": hit}), flush=True)
        table.append(f"| {cold['pairs_in']:,} | {cold['tokens']:,} | {cold['seconds']} ({cold['load']}) | "
                     f"{hit['seconds']} ({hit['load']}) | {cold['peak_rss_mb']} ({cold['peak_rss_workers_mb']}) | "
                     f"{hit['peak_rss_mb']} | {cold['rss_after_imports_mb']} | {cold['cache_mb']} |")
    print("\n".join(table))


if __name__ == "__main__":
    main()
