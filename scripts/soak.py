"""Soak: does a long run hold steady? The embedded default (`dpo-train` with no arguments: tiny model, built-in
pairs, W&B offline) for N steps with validation and generation every 100 steps, watched from inside the process.

    python scripts/soak.py                        # 3,000 steps (the full soak; hours on two CPU cores)
    python scripts/soak.py --steps 300            # a quick check
    nice python scripts/soak.py --steps 400 --out outputs/soak/quick

Recorded (``<out>/soak.json`` and ``<out>/soak.md``): after each validation the peak RSS (VmHWM) and current RSS
of the training process, the W&B offline run folder's and the generations folder's size, the wall time; every
20 steps the open file handles and threads. Checks (exit status 1 when one fails):
- peak RSS after the last validation within 5% of that after the second (the first includes warm-up);
- open file handles and threads flat: after the second validation they stay within +2 of its values;
- bounded size per step: W&B and generations bytes per step in the last interval at most 1.5x the second's.
Not a CI test: it runs for as long as N asks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import lightning as L

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]  # the checkout's package, also when not installed


def _status(field: str) -> int:
    """A field of /proc/self/status (kB fields in bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            value = line.split()[1]
            return int(value) * (1024 if line.rstrip().endswith("kB") else 1)
    return -1


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


class SoakProbe(L.Callback):
    """Appends one JSON line per sample to ``record``: ``kind`` "val" after each validation in fit, "tick"
    every ``every`` steps (handles and threads only)."""

    def __init__(self, record: str, run_dir: str, every: int = 20):
        self.record, self.run_dir, self.every = Path(record), Path(run_dir), int(every)
        self.start = time.perf_counter()

    def _write(self, row: dict) -> None:
        with self.record.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def _common(self, trainer, kind: str) -> dict:
        cpu = os.times()
        return {"kind": kind, "step": trainer.global_step, "seconds": round(time.perf_counter() - self.start, 2),
                "cpu_seconds": round(cpu.user + cpu.system, 2),
                "open_files": len(os.listdir("/proc/self/fd")), "threads": _status("Threads")}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self._write(self._common(trainer, "tick"))

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        self._write({**self._common(trainer, "val"), "peak_rss": _status("VmHWM"), "rss": _status("VmRSS"),
                     "wandb_bytes": folder_bytes(self.run_dir / "wandb"),
                     "generations_bytes": folder_bytes(self.run_dir / "generations")})


def run(steps: int, out: Path, every: int) -> list[dict]:
    from hydra import compose, initialize_config_dir

    from dpo_lightning.cli.locate import config_dir
    from dpo_lightning.train import train

    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1")  # never the network
    record = out / "samples.jsonl"
    record.unlink(missing_ok=True)
    overrides = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={every}", "print_config=false",
                 f"paths.output_dir={out / 'run'}", "callbacks.progress_bar=null",
                 "+callbacks.soak._target_=soak.SoakProbe", f"+callbacks.soak.record={record}",
                 f"+callbacks.soak.run_dir={out / 'run'}"]
    sys.path[:0] = [str(HERE)]  # `soak.SoakProbe` for Hydra's instantiate
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    train(cfg)
    return [json.loads(line) for line in record.read_text().splitlines()]


def check(samples: list[dict]) -> dict:
    vals = [s for s in samples if s["kind"] == "val"]
    if len(vals) < 3:
        raise SystemExit("soak: need at least 3 validations (--steps >= 3 x --every)")
    second, last = vals[1], vals[-1]
    after = [s for s in samples if s["step"] >= second["step"]]

    def per_step(key: str, a: dict, b: dict) -> float:
        return (b[key] - a[key]) / max(b["step"] - a["step"], 1)

    growth = {k: (per_step(k, vals[0], vals[1]), per_step(k, vals[-2], vals[-1]))
              for k in ("wandb_bytes", "generations_bytes")}
    checks = {
        "peak RSS after the last validation within 5% of the second's": last["peak_rss"] <= 1.05 * second["peak_rss"],
        "open files flat (within +2 after the second validation)":
            max(s["open_files"] for s in after) <= second["open_files"] + 2,
        "threads flat (within +2 after the second validation)": max(s["threads"] for s in after) <= second["threads"] + 2,
        **{f"{k} per step bounded (last interval <= 1.5x the second's)": last_g <= 1.5 * max(first_g, 1.0)
           for k, (first_g, last_g) in growth.items()},
    }
    intervals = [(b["seconds"] - a["seconds"]) * 100 / (b["step"] - a["step"]) for a, b in zip(vals, vals[1:])]
    cpu = [(b["cpu_seconds"] - a["cpu_seconds"]) * 100 / (b["step"] - a["step"]) for a, b in zip(vals, vals[1:])]
    return {"steps": last["step"], "validations": len(vals), "checks": checks, "passed": all(checks.values()),
            "seconds_per_100_steps": {"mean": sum(intervals) / len(intervals), "max": max(intervals)},
            "cpu_seconds_per_100_steps": {"mean": sum(cpu) / len(cpu), "max": max(cpu)},
            "peak_rss_mb": {"second": second["peak_rss"] / 2**20, "last": last["peak_rss"] / 2**20},
            "rss_mb": {"second": second["rss"] / 2**20, "last": last["rss"] / 2**20},
            "open_files": {"second": second["open_files"], "max_after": max(s["open_files"] for s in after)},
            "threads": {"second": second["threads"], "max_after": max(s["threads"] for s in after)},
            "bytes_per_step": {k: {"second_interval": g[0], "last_interval": g[1]} for k, g in growth.items()},
            "folder_bytes_at_end": {"wandb": last["wandb_bytes"], "generations": last["generations_bytes"]},
            "validations_table": vals}


def markdown(report: dict) -> str:
    lines = [f"# Soak: {report['steps']} steps, {report['validations']} validations (from the first after step 0)", "",
             "| step | s | peak RSS MB | RSS MB | open files | threads | W&B MB | generations MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in report["validations_table"]:
        lines.append(f"| {v['step']} | {v['seconds']:.0f} | {v['peak_rss'] / 2**20:.1f} | {v['rss'] / 2**20:.1f} | "
                     f"{v['open_files']} | {v['threads']} | {v['wandb_bytes'] / 2**20:.2f} | "
                     f"{v['generations_bytes'] / 2**20:.3f} |")
    lines += ["", f"seconds per 100 steps (training + validation + generation): "
              f"{report['seconds_per_100_steps']['mean']:.1f} mean, {report['seconds_per_100_steps']['max']:.1f} max "
              f"wall; {report['cpu_seconds_per_100_steps']['mean']:.1f} mean CPU seconds (user + system)",
              ""] + [f"- [{'x' if ok else ' '}] {name}" for name, ok in report["checks"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    parser.add_argument("--every", type=int, default=100, help="validation + generation every N steps")
    parser.add_argument("--out", type=Path, default=Path("outputs/soak") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    report = check(run(args.steps, args.out, args.every))
    (args.out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "soak.md").write_text(markdown(report))
    print(markdown(report))
    print(f"soak: {'passed' if report['passed'] else 'FAILED'}; figures in {args.out}/soak.json and soak.md")
    raise SystemExit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
