"""A/B of ``engine.recompute_pointwise`` (selective recomputation, ``dpo_lightning/engine/recompute.py``): the same
policy with the option on and off, in one process, on the same batches, interleaved (ABBA), so a contended
machine slows both alike. Prints one JSON: median step time of each, their ratio, the median of per-batch
ratios, and (in a second process) the activation memory each keeps after the forward on the widest batch.

    PYTHONPATH=. python scripts/recompute_ab.py                       # SmolLM2-135M's shape, 1 thread
    PYTHONPATH=. python scripts/recompute_ab.py --shape small --rounds 20 --threads 2

Model: a shape of ``scripts/bench_lib.py`` (Llama, vocabulary 50,257, random weights, fp32). Step: a no-grad
reference forward (a frozen copy), the policy's forward + backward through ``sequence_logps``, 4 pairs per batch
in the default ``prefix_shared`` layout; prompts 20-200 tokens, completions 10-80 (seeded, as
``scripts/engine_ab.py``). Memory (``--memory``, run by the driver in a child process): RSS growth over the
policy's forward with glibc told from the start to return big blocks on free (``mallopt``), i.e. the tensors the
forward leaves for the backward.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from bench_lib import SHAPES  # noqa: E402
from engine_ab import batches  # noqa: E402

from dpo_lightning.engine.logprobs import sequence_logps  # noqa: E402
from dpo_lightning.engine.recompute import disable_selective_recompute, enable_selective_recompute  # noqa: E402


def step(policy, reference, batch) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        ref = sequence_logps(reference, batch, batch["num_sequences"])
    out = sequence_logps(policy, batch, batch["num_sequences"])
    ((out.logps - ref.logps) * torch.linspace(-1, 1, out.logps.numel())).sum().backward()
    policy.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def rss_mb() -> float:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024


def kept_mb(policy, batch) -> float:
    gc.collect()
    before = rss_mb()
    out = sequence_logps(policy, batch, batch["num_sequences"])
    held = rss_mb() - before
    out.logps.sum().backward()
    policy.zero_grad(set_to_none=True)
    return held


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory", action="store_true", help="only the memory figures (the driver's child)")
    args = p.parse_args()
    if args.memory:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: big blocks back to the OS on free
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50257, max_position_embeddings=1024, pad_token_id=0, attn_implementation="sdpa",
                      **SHAPES[args.shape])
    torch.manual_seed(0)
    policy = LlamaForCausalLM(cfg).float()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    data = batches(args.rounds + 1, cfg.vocab_size)
    settings = {"on": lambda: enable_selective_recompute(policy), "off": lambda: disable_selective_recompute(policy)}
    if args.memory:
        widest = max(data, key=lambda b: b["input_ids"].numel())
        kept = {}
        for name in ("off", "on"):
            settings[name]()
            kept_mb(policy, widest)  # first call: allocations (and the one-time in-place probe of "on")
            kept[name] = kept_mb(policy, widest)
        print("MEMORY " + json.dumps({"widest_batch": list(widest["input_ids"].shape), "kept_after_forward_mb": kept,
                                      "kept_ratio": kept["on"] / kept["off"]}))
        return
    for name in ("on", "off"):  # warm-up (and the one-time in-place probe of "on")
        settings[name]()
        step(policy, reference, data[0])
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i, b in enumerate(data[1:]):  # ABBA
        for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
            settings[name]()
            times[name].append(step(policy, reference, b))
    child = subprocess.run([sys.executable, __file__, "--memory", "--shape", args.shape, "--rounds", str(args.rounds),
                            "--threads", str(args.threads)], capture_output=True, text=True, check=True)
    memory = json.loads(child.stdout.split("MEMORY ")[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"shape": args.shape, "rounds": args.rounds, "threads": args.threads,
                      "median_step_s": med, "ratio_on_over_off": med["on"] / med["off"],
                      "median_pairwise_ratio": statistics.median(a / b for a, b in zip(times["on"], times["off"])),
                      **memory}, indent=2))


if __name__ == "__main__":
    main()
