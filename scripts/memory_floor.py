"""The memory floor, measured as a user runs it: ``dpo-train`` (default callbacks, ``logger=none``) against TRL
1.16's ``DPOTrainer`` on the same model, pairs, batches and settings; each in its own process, the peak RSS of
that process (``wait4``'s ``ru_maxrss``). Prints one JSON and, on stderr, the table with the ratio.

    python scripts/memory_floor.py --trl-python /work/trlenv/bin/python          # ours (cold + warm cache) vs TRL
    python scripts/memory_floor.py --only ours_warm --account                    # + where ours' memory goes
    python scripts/memory_floor.py --shape tiny --steps 2 --only ours_cold        # the plumbing, in seconds

Runs:

    ours_cold   ``dpo-train model=hf model.name_or_path=<benchmark model> model.dtype=float32
                data.path=<HH-RLHF pairs> data.batch_size=4 data.max_length=256 data.val_fraction=0 logger=none
                trainer.max_steps=<steps>`` with an empty cache (a first run: tokenizes)
    ours_warm   the same command again (the tokenization cache is hit, as on every later run and sweep job)
    trl         ``scripts/benchmark_trl.py``: TRL's ``DPOTrainer`` (fp32, sigmoid, β 0.1, AdamW, clipping 1.0,
                no gradient checkpointing, no checkpoint saving) on the pairs of ours' first ``steps``
                batches, in ours' order (``train_sampling_strategy="sequential"``), so both hold the same
                longest batch

``--account`` also runs ``scripts/memory_account.py`` (the same command with the RSS read at every phase) and
prints where the memory goes. ``--steps`` bounds the run (the peak is reached within the first steps; the
longest batch of ours' first 10 is 303 positions wide, 393 scored tokens). Validation is off in both
(``data.val_fraction=0``; TRL gets no eval set), so both measure training alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from benchmark import build_model_dir, data_source, shared_data  # noqa: E402


def run_peak(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 3600) -> dict:
    """Run ``cmd`` to completion; its own peak RSS (``wait4``: this child and its waited-for children)."""
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"{cmd[:3]} ran past {timeout} s; log: {log}")
            time.sleep(0.2)
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({code}); last lines of {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-25:]))
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - t, "log": str(log)}


def dpo_train_overrides(args, model_dir: Path, out: Path, cache: Path) -> list[str]:
    return [
        "model=hf", f"model.name_or_path={model_dir}", "model.dtype=float32", f"data.path={args.data_path}",
        f"data.batch_size={args.batch_size}", f"data.max_length={args.max_length}", "data.val_fraction=0",
        "data.max_drop_fraction=1.0",  # short max_length on HH-RLHF drops most rows on purpose: measure the rest
        "logger=none", f"trainer.max_steps={args.steps}", f"seed={args.seed}", f"paths.output_dir={out}",
        f"paths.cache_dir={cache}",
    ] + list(args.override or [])


def dpo_train_command(args, model_dir: Path, out: Path, cache: Path) -> list[str]:
    """The user's command: the ``dpo-train`` console script beside this python (else ``-m``)."""
    exe = Path(sys.executable).with_name("dpo-train")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "dpo_lightning.train"]
    return head + dpo_train_overrides(args, model_dir, out, cache)


def trl_rows(args, model_dir: Path, cache: Path, path: Path) -> dict:
    """benchmark_trl.py's input: the records of ours' first ``steps`` batches, in ours' order."""
    from dpo_lightning.data.datamodule import PreferenceDataModule
    from dpo_lightning.data.formats import load_records, normalize
    from dpo_lightning.models.hf import ModelSpec

    dm = PreferenceDataModule(args.data_path, ModelSpec(str(model_dir)), batch_size=args.batch_size,
                              max_length=args.max_length, val_fraction=0.0, cache_dir=str(cache), seed=args.seed)
    dm.setup("fit")
    loader = dm.train_dataloader()
    order = [list(b) for b, _ in zip(loader.batch_sampler, range(args.steps))]
    if len(order) < args.steps:
        raise SystemExit(f"--steps {args.steps}: the data holds only {len(order)} batches")
    records = normalize(load_records(args.data_path), where=args.data_path)
    rows = [dm.train_rows[i] for b in order for i in b]
    data = {"records": [records[r["index"]] for r in rows],
            "rows": [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows],
            "batches": [list(range(i * args.batch_size, (i + 1) * args.batch_size)) for i in range(len(order))]}
    path.write_text(json.dumps(data))
    lengths = [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    widest = max(range(len(order)), key=lambda i: max(p + max(c, r) for p, c, r in lengths[i * args.batch_size:
                                                                                       (i + 1) * args.batch_size]))
    return {"pairs": len(rows), "widest_batch": widest,
            "widest_plain_length": max(p + max(c, r) for p, c, r in lengths)}


def account_table(account: dict) -> str:
    lines = [f"   {'phase':<64}{'peak MB':>9}{'RSS after':>11}  notes"]
    for p in account["phases"]:
        notes = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in p.items()
                 if k not in ("phase", "peak_mb", "rss_mb", "anon_mb", "file_mb", "t")}
        lines.append(f"   {p['phase'][:63]:<64}{p['peak_mb']:>9.0f}{p['rss_mb']:>11.0f}  {notes or ''}")
    lines.append(f"   heavy optional modules loaded: {[m for m, v in account['modules'].items() if v]}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="training steps of every run (the same batches)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--shape", default="small", help="benchmark model shape (scripts/bench_lib.py)")
    p.add_argument("--trl-python", default=None, help="a python with TRL 1.16 (e.g. /work/trlenv/bin/python)")
    p.add_argument("--only", nargs="*", default=None, help="runs: ours_cold ours_warm trl (default: all available)")
    p.add_argument("--account", action="store_true", help="also run scripts/memory_account.py (phases)")
    p.add_argument("-o", "--override", action="append", help="extra dpo-train override (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, run folders)")
    args = p.parse_args(argv)
    args.data = "hh-rlhf" if shared_data() else "builtin"
    args.data_path = data_source(args.data)[0]
    return args


def main() -> None:
    args = parse_args()
    runs = args.only or ["ours_cold", "ours_warm"] + (["trl"] if args.trl_python else [])
    if "trl" in runs and not args.trl_python:
        sys.exit("--trl-python is needed for the TRL run")
    model_dir = build_model_dir(args.shape, args.data)
    work = Path(tempfile.mkdtemp(prefix="dpo-memory-"))
    cache = work / "cache"
    results: dict[str, dict] = {}
    for name in runs:
        if name == "ours_warm" and not any(cache.glob("*/meta.json")):  # warm it the way a first run does
            run_peak(dpo_train_command(args, model_dir, work / "run-warmup", cache), work / "warmup.log")
        if name == "ours_cold":
            shutil.rmtree(cache, ignore_errors=True)  # a first run: nothing cached (it fills the cache)
        if name.startswith("ours"):
            results[name] = run_peak(dpo_train_command(args, model_dir, work / f"run-{name}", cache),
                                     work / f"{name}.log")
        elif name == "trl":
            rows = work / "trl_rows.json"
            info = trl_rows(args, model_dir, work / "cache-trl", rows)
            cmd = [args.trl_python, str(SCRIPTS / "benchmark_trl.py"), "--model-dir", str(model_dir), "--rows",
                   str(rows), "--steps", str(args.steps), "--warmup", "0", "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--seed", str(args.seed), "--peak-flops", "1"]
            results[name] = {**run_peak(cmd, work / "trl.log"), **info}
        else:
            sys.exit(f"unknown run {name!r}: ours_cold, ours_warm, trl")
        print(f"[memory_floor] {name}: peak RSS {results[name]['peak_rss_mb']:.0f} MB "
              f"({results[name]['seconds']:.0f} s)", file=sys.stderr)
    account = None
    if args.account:
        if not any(cache.glob("*/meta.json")):  # the tokenization cache (data.cache_dir)
            run_peak(dpo_train_command(args, model_dir, work / "run-warmup", cache), work / "warmup.log")
        cmd = [sys.executable, str(SCRIPTS / "memory_account.py")] + dpo_train_overrides(
            args, model_dir, work / "run-account", cache)
        results["ours_account"] = run_peak(cmd, work / "account.log")
        line = next(ln for ln in reversed(Path(results["ours_account"]["log"]).read_text().splitlines())
                    if ln.startswith("MEMORY_ACCOUNT "))
        account = json.loads(line[len("MEMORY_ACCOUNT "):])
    ratios = {f"{o}/trl": results[o]["peak_rss_mb"] / results["trl"]["peak_rss_mb"]
              for o in ("ours_cold", "ours_warm") if o in results and "trl" in results}
    report = {"shape": args.shape, "data": args.data, "batch_size": args.batch_size, "max_length": args.max_length,
              "steps": args.steps, "runs": results, "ratios": ratios, "account": account,
              "load_average": os.getloadavg()}
    print(json.dumps(report, indent=2))
    print(f"== memory floor: shape {args.shape}, {args.batch_size} pairs/step, max_length {args.max_length}, "
          f"{args.steps} steps, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    for name, r in results.items():
        print(f"   {name:<14} peak RSS {r['peak_rss_mb']:>7.0f} MB", file=sys.stderr)
    for name, v in ratios.items():
        print(f"   {name:<22} {v:.3f}x", file=sys.stderr)
    if account:
        print(account_table(account), file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
