"""The cost curve: pairs/s and peak memory of dpo_lightning and TRL 1.16 as the work grows, on the small
benchmark model: ``max_length`` 256, 512, 1024 (4 pairs/step) and 2, 4, 8 pairs/step (max_length 256).

    python scripts/cost_curve.py --trl-python /work/trlenv/bin/python          # CSV + PNG under docs/
    python scripts/cost_curve.py --shape tiny --steps 1 --warmup 1 --out /tmp/c   # the plumbing, in minutes

Every point is one ``scripts/benchmark.py`` invocation (``--only ours trl``): one seeded subset and one batch
list per point that both contenders train on, in the same order, each in its own process (peak RSS = that
process's), warm-up batches untimed. ``--trl-points`` limits TRL to some points (it is ~10x slower). Writes
``<out>/cost_curve.csv`` (one row per contender and point: rates, peak RSS, the timed pairs' mean prompt /
chosen / rejected tokens, the tokens each contender's model ran over per pair, padding, the shares of the
useful FLOPs that are linear in the tokens, LM head and attention) and ``<out>/cost_curve.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
LENGTHS, BATCHES = (256, 512, 1024), (2, 4, 8)
FIELDS = ["contender", "max_length", "batch_size", "steps", "pairs_per_s", "tokens_per_s", "seconds_per_step",
          "peak_rss_mb", "prompt_per_pair", "chosen_per_pair", "rejected_per_pair", "processed_per_pair",
          "prompt_share", "padding", "share_linear", "share_lm_head", "share_attention", "useful_flop_util",
          "load_before", "load_after"]


def points(lengths=LENGTHS, batches=BATCHES, base_length: int = 256, base_batch: int = 4) -> list[tuple[int, int]]:
    """(max_length, batch_size): the length sweep at ``base_batch`` and the batch sweep at ``base_length``."""
    out = [(L, base_batch) for L in lengths] + [(base_length, b) for b in batches]
    return sorted(set(out), key=out.index)


def run_point(args, length: int, batch: int, trl: bool) -> dict:
    cmd = [sys.executable, str(SCRIPTS / "benchmark.py"), "--shape", args.shape, "--max-length", str(length),
           "--batch-size", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--only", "ours"] + (["trl", "--trl-python", args.trl_python] if trl else [])
    load = os.getloadavg()[0]
    env = dict(os.environ)
    if args.threads:  # every contender's process (and the matmul peak they measure) on this many threads
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    report["load_before"] = load
    return report


def rows_of(report: dict) -> list[dict]:
    out = []
    for name, r in report["runs"].items():
        t, n = r["timed_tokens"], r["pairs"]
        shares = r.get("useful_flop_shares") or {}
        out.append({
            "contender": {"ours": "dpo_lightning", "trl": "TRL 1.16"}.get(name, name),
            "max_length": report["max_length"], "batch_size": report["batch_size"], "steps": r["steps"],
            "pairs_per_s": r["pairs_per_s"], "tokens_per_s": r["tokens_per_s"], "seconds_per_step": r["seconds"] /
            r["steps"], "peak_rss_mb": r["peak_rss_mb"], "prompt_per_pair": t["prompt"] / n,
            "chosen_per_pair": t["chosen"] / n, "rejected_per_pair": t["rejected"] / n,
            "processed_per_pair": t["processed_tokens"] / n, "prompt_share": t["prompt"] / t["pair_tokens"],
            "padding": r["padding_fraction"], "share_linear": shares.get("linear"),
            "share_lm_head": shares.get("lm_head"), "share_attention": shares.get("attention"),
            "useful_flop_util": r["useful_flop_utilisation"], "load_before": report["load_before"],
            "load_after": r["load_average_after"][0],
        })
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    os.replace(tmp, path)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    sweeps = (("max_length", "batch_size", 4, "max_length (4 pairs/step)"),
              ("batch_size", "max_length", 256, "pairs per step (max_length 256)"))
    for col, (x, fixed, value, label) in enumerate(sweeps):
        for name, style in (("dpo_lightning", dict(marker="o", color="C0")), ("TRL 1.16", dict(marker="s",
                                                                                                 color="C3"))):
            pts = sorted((r[x], r) for r in rows if r["contender"] == name and r[fixed] == value)
            if not pts:
                continue
            xs = [p for p, _ in pts]
            axes[0, col].plot(xs, [r["pairs_per_s"] for _, r in pts], label=name, **style)
            axes[1, col].plot(xs, [r["peak_rss_mb"] for _, r in pts], label=name, **style)
            for p, r in pts:
                axes[0, col].annotate(f"{r['pairs_per_s']:.2f}", (p, r["pairs_per_s"]), textcoords="offset points",
                                      xytext=(4, 4), fontsize=8)
                axes[1, col].annotate(f"{r['peak_rss_mb']:.0f}", (p, r["peak_rss_mb"]), textcoords="offset points",
                                      xytext=(4, 4), fontsize=8)
        for row, ylabel in ((0, "pairs / s (log)"), (1, "peak RSS (MB)")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_xticks(LENGTHS if x == "max_length" else BATCHES, [str(v) for v in (
                LENGTHS if x == "max_length" else BATCHES)])
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
        axes[0, col].set_yscale("log")
        axes[0, col].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axes[0, col].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[1, col].set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trl-python", default=None, help="a python with TRL 1.16 (e.g. /work/trlenv/bin/python)")
    p.add_argument("--trl-points", nargs="*", default=None,
                   help="the points TRL runs, as LENGTHxBATCH (e.g. 256x4 1024x4); default: all")
    p.add_argument("--points", nargs="*", default=None, help="only these points, as LENGTHxBATCH (default: all)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per point (both contenders)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--shape", default="small")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of every run (default: torch's; 1 keeps a busy machine's figures sane)")
    p.add_argument("--out", default=str(REPO / "docs"), help="folder for cost_curve.csv / cost_curve.png")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per point")
    p.add_argument("--from-csv", action="store_true", help="only redraw the PNG from <out>/cost_curve.csv")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "cost_curve.csv", out / "cost_curve.png"
    if args.from_csv:
        with open(csv_path) as f:
            rows = [{k: (v if k == "contender" else float(v) if v not in ("", "None") else None)
                     for k, v in r.items()} for r in csv.DictReader(f)]
    else:
        rows, t0 = [], time.perf_counter()
        todo = [tuple(int(v) for v in p.split("x")) for p in args.points] if args.points else points()
        for length, batch in todo:
            trl = bool(args.trl_python) and (args.trl_points is None or f"{length}x{batch}" in args.trl_points)
            report = run_point(args, length, batch, trl)
            rows += rows_of(report)
            for r in rows_of(report):
                print(f"[cost_curve] {r['contender']:<14} L={length:<5} B={batch}: {r['pairs_per_s']:.2f} pairs/s, "
                      f"{r['peak_rss_mb']:.0f} MB ({time.perf_counter() - t0:.0f} s, load {r['load_after']:.1f})",
                      file=sys.stderr)
            write_csv(rows, csv_path)  # after every point: a later failure keeps the measured ones
    load = max(r["load_after"] for r in rows)
    plot(rows, png_path, f"{args.shape} Llama (29.9M), fp32 CPU, HH-RLHF pairs, {int(rows[0]['steps'])} timed "
                         f"steps per point; highest 1-min load average during the runs: {load:.1f}")
    print(json.dumps({"csv": str(csv_path), "png": str(png_path), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
