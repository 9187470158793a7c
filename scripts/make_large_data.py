"""Synthetic large preference sets: the shared HH-RLHF pairs repeated to N distinct rows.

    python scripts/make_large_data.py --pairs 100000 --out /tmp/hh-100k.jsonl

Row j is pair ``j % 1500`` of ``../shared/data/hh-rlhf-harmless-base-test.jsonl.gz``; from the second copy on,
its first human turn is prefixed with a copy tag (``[copy k] ``) in both ``chosen`` and ``rejected`` and its
answers end in a copy suffix, so every row is distinct (a distinct prompt and distinct completions, hence a
distinct tokenization cache entry) while lengths stay those of real data. The output is implicit-prompt
JSONL, the shape of the original.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

DEFAULT_SOURCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
HUMAN = "\n\nHuman: "


def vary(text: str, k: int) -> str:
    """Copy ``k`` of one side of a pair: a tag after the first human marker and a suffix at the end."""
    if k == 0:
        return text
    if text.startswith(HUMAN):
        text = f"{HUMAN}[copy {k}] {text[len(HUMAN):]}"
    else:
        text = f"[copy {k}] {text}"
    return f"{text} ({k})"


def make(pairs: int, out: Path, source: Path = DEFAULT_SOURCE) -> int:
    with gzip.open(source, "rt", encoding="utf-8") as fh:
        base = [json.loads(line) for line in fh if line.strip()]
    opener = gzip.open if out.suffix == ".gz" else open
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    with opener(tmp, "wt", encoding="utf-8") as fh:
        for j in range(pairs):
            row, k = base[j % len(base)], j // len(base)
            fh.write(json.dumps({"chosen": vary(row["chosen"], k), "rejected": vary(row["rejected"], k)}) + "\n")
    tmp.replace(out)  # atomic
    return pairs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, required=True, help="rows to write")
    ap.add_argument("--out", type=Path, required=True, help=".jsonl or .jsonl.gz")
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="HH-RLHF pairs (implicit-prompt JSONL.gz)")
    args = ap.parse_args(argv)
    print(f"wrote {make(args.pairs, args.out, args.source)} pairs to {args.out}")


if __name__ == "__main__":
    main()
