"""TRL 1.16 ``DPOTrainer`` on the benchmark's model and rows: the reference point of ``scripts/benchmark.py``.

Runs under an environment that has TRL (TRL is not a dependency of dpo_lightning and this file imports nothing
from it):

    /work/trlenv/bin/python scripts/benchmark_trl.py --model-dir DIR --rows ROWS.json --steps 40 [--precompute]

``scripts/benchmark.py`` prepares DIR (the model, saved with ``save_pretrained``, and the GPT-2 tokenizer) and
ROWS.json (the same normalized text records and the token ids dpo_lightning made of them), runs this script in
its own process (so ``ru_maxrss`` is this run's peak) and reads the JSON line it prints last. TRL tokenizes the
text itself; the script checks that its ids equal ours, then trains on its own tokenization (identical when
``tokenization_match`` is 1.0). Settings mirror ours: fp32 on CPU, 4 pairs per step, max_length 256, sigmoid
loss with beta 0.1, fused AdamW (TRL's default), gradient clipping 1.0, no gradient checkpointing, no logging
to services.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import matmul_peak_flops  # noqa: E402  (stdlib-only module level: safe in TRL's environment)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--rows", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--precompute", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    data = json.load(open(args.rows))
    records, ours = data["records"], data["rows"]
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    peak = matmul_peak_flops()

    class Timer(TrainerCallback):
        def __init__(self):
            self.starts, self.ends = [], []

        def on_step_begin(self, args_, state, control, **kw):
            self.starts.append(time.perf_counter())

        def on_step_end(self, args_, state, control, **kw):
            self.ends.append(time.perf_counter())

    timer = Timer()
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    cfg = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size, max_length=args.max_length,
        max_steps=args.warmup + args.steps, learning_rate=1e-6, beta=0.1, loss_type=["sigmoid"],
        bf16=False, fp16=False, gradient_checkpointing=args.gradient_checkpointing, use_cpu=True,
        precompute_ref_log_probs=args.precompute, report_to=[], save_strategy="no", logging_steps=10,
        disable_tqdm=True, dataloader_num_workers=0, seed=args.seed, data_seed=args.seed,
        dataset_num_proc=None,
    )
    t_prep = time.perf_counter()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(records), processing_class=tok,
                         callbacks=[timer])
    prep_seconds = time.perf_counter() - t_prep
    ds = trainer.train_dataset
    L = args.max_length  # TRL keeps full ids in the dataset and truncates (prompt + completion)[:L] when collating
    theirs = {(tuple(r["prompt_ids"]), tuple(r["chosen_ids"][:L - len(r["prompt_ids"])]),
               tuple(r["rejected_ids"][:L - len(r["prompt_ids"])]))
              for r in ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])}
    mine = {(tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"])) for r in ours}
    match = len(theirs & mine) / max(len(mine), 1)

    # which pairs each step sees: wrap the collator to record the lengths (for tokens/s and useful FLOPs)
    seen: list[list[tuple[int, int, int]]] = []
    inner = trainer.data_collator

    def recording_collator(examples):
        seen.append([(len(e["prompt_ids"]), min(len(e["chosen_ids"]), L - len(e["prompt_ids"])),
                      min(len(e["rejected_ids"]), L - len(e["prompt_ids"]))) for e in examples])
        return inner(examples)

    trainer.data_collator = recording_collator
    trainer.train()
    peak = max(peak, matmul_peak_flops())
    w = args.warmup
    seconds = timer.ends[-1] - timer.starts[w]
    steps = len(timer.ends) - w
    # the collator runs one batch ahead of the step (prefetch); pair the steps with the first `steps` batches
    timed = seen[w:w + steps]
    result = {
        "name": "trl_precompute" if args.precompute else "trl",
        "trl_version": __import__("trl").__version__,
        "steps": steps, "seconds": seconds,
        "pairs": sum(len(b) for b in timed),
        "batch_lengths": timed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "matmul_peak_flops": peak,
        "setup_seconds": prep_seconds,
        "tokenization_match": match,
        "torch_threads": torch.get_num_threads(),
        "step_seconds": [e - s for s, e in zip(timer.starts[w:], timer.ends[w:])],
        "load_average_after": os.getloadavg(),
    }
    print("BENCH_RESULT " + json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
