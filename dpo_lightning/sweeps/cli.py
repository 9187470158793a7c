"""dpo-sweep-report: rebuild a sweep's report from its folder (also while it runs, or after an interruption).

    dpo-sweep-report outputs/train/multiruns/2026-01-01_12-00-00
    dpo-sweep-report <folder> --no-plots
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpo_lightning.sweeps.report import job_folders, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-sweep-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="the sweep folder (the one holding 0/, 1/, ... and multirun.yaml)")
    parser.add_argument("--no-plots", action="store_true", help="write the CSV and Markdown tables only")
    args = parser.parse_args(argv)
    folder = Path(args.sweep_dir)
    if not folder.is_dir():
        print(f"error: {folder}: no such folder", file=sys.stderr)
        return 2
    if not job_folders(folder):
        print(f"error: {folder}: no job folders (no */job_summary.json or */.hydra); is this a sweep folder?",
              file=sys.stderr)
        return 2
    df = write_report(folder, plots=not args.no_plots, print_table=True)
    return 1 if (df["status"] == "failed").any() else 0


if __name__ == "__main__":
    raise SystemExit(main())
