"""A/B of the log-prob engine on the Llama path: an earlier engine (``logprobs.py`` at a git revision)
against the current one, in one process, on the same model and batches, interleaved (ABBA), so a contended
machine slows both alike. Prints one JSON with the median step time of each and their ratio.

    PYTHONPATH=. python scripts/engine_ab.py                      # old = acaf11b (the engine before architecture quirks)
    PYTHONPATH=. python scripts/engine_ab.py --old-rev main --rounds 20

Model: the CPU benchmark's Llama (``scripts/benchmark.py``: hidden 256, 4 layers, vocab 50,257, fp32).
Step: policy forward + backward and a no-grad reference forward (a frozen copy) through ``sequence_logps``,
4 pairs per batch in the default ``prefix_shared`` layout; prompt 20-200 tokens, completions 10-80 (seeded).
The current engine's one-time probe (``engine_check.verify``) is timed separately.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def old_engine(rev: str):
    """``dpo_lightning/engine/logprobs.py`` as of ``rev``, imported as a separate module (it needs only torch)."""
    src = subprocess.run(["git", "show", f"{rev}:dpo_lightning/engine/logprobs.py"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="engine-ab-")) / "old_logprobs.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_logprobs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batches(n: int, vocab: int, seed: int = 0):
    from dpo_lightning.data.collate import PreferenceCollator

    g = torch.Generator().manual_seed(seed)

    def toks(lo, hi):
        return torch.randint(4, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    collate = PreferenceCollator(0, layout="prefix_shared")
    return [collate([{"prompt_ids": toks(20, 200), "chosen_ids": toks(10, 80), "rejected_ids": toks(10, 80),
                      "index": i} for i in range(4)]) for _ in range(n)]


def step(engine, policy, reference, batch) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        ref = engine.sequence_logps(reference, batch, batch["num_sequences"])
    out = engine.sequence_logps(policy, batch, batch["num_sequences"])
    ((out.logps - ref.logps) * torch.linspace(-1, 1, out.logps.numel())).sum().backward()
    policy.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--old-rev", default="acaf11b")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_lightning.engine import logprobs as new
    from dpo_lightning.engine.probe import verify

    cfg = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=50257, max_position_embeddings=1024, tie_word_embeddings=False,
                      pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    policy = LlamaForCausalLM(cfg).float()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    old = old_engine(args.old_rev)
    data = batches(args.rounds + 2, cfg.vocab_size)
    for b in data[:2]:  # warm-up, both engines
        step(old, policy, reference, b), step(new, policy, reference, b)
    t = time.perf_counter()  # after the warm-up: the probe's own cost, not first-call allocations
    verify(policy, label="policy")
    verify(reference, label="reference")
    probe_s = time.perf_counter() - t
    times = {"old": [], "new": []}
    for i, b in enumerate(data[2:]):  # ABBA: alternate which engine runs first
        order = (("old", old), ("new", new)) if i % 2 == 0 else (("new", new), ("old", old))
        for name, engine in order:
            times[name].append(step(engine, policy, reference, b))
    med = {k: statistics.median(v) for k, v in times.items()}
    pair_ratios = [n / o for n, o in zip(times["new"], times["old"])]
    print(json.dumps({"old_rev": args.old_rev, "rounds": args.rounds, "threads": args.threads,
                      "median_step_s": med, "ratio_new_over_old": med["new"] / med["old"],
                      "median_pairwise_ratio": statistics.median(pair_ratios),
                      "probe_seconds_once": probe_s}, indent=2))


if __name__ == "__main__":
    main()
