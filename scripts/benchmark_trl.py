"""TRL 1.16 ``DPOTrainer`` on the benchmark's model, pairs and batch list: the reference point of
``scripts/benchmark.py``.

Runs under an environment that has TRL (TRL is not a dependency of dpo_lightning and this file imports nothing
from it):

    /work/trlenv/bin/python scripts/benchmark_trl.py --model-dir DIR --rows ROWS.json --steps 16 [--precompute]

``scripts/benchmark.py`` prepares DIR (the model, saved with ``save_pretrained``, and the GPT-2 tokenizer) and
ROWS.json (the normalized text records, the token ids dpo_lightning made of them and the one batch list every
contender trains on), runs this script in its own process (so ``ru_maxrss`` is this run's peak) and reads the
JSON line it prints last. The records go into TRL's dataset in the batch list's order and TRL samples them
sequentially (``train_sampling_strategy="sequential"``), so its steps see exactly the list's batches; the
collator is wrapped to record which pairs each step trained on (checked against the list by token ids: a pair
whose ids differ from ours is reported as -1 and the driver refuses the comparison). Settings mirror ours: fp32
on CPU (bf16 weights and ``bf16=True`` on CUDA), 4 pairs per step, max_length 256, sigmoid loss with beta 0.1,
fused AdamW (TRL's default), gradient clipping 1.0, no gradient checkpointing, no logging to services.

``--shape vision`` (ROWS.json says ``"vision": true``): DIR holds an image-text-to-text model and its processor;
the records' image paths are opened as PIL images (TRL's vision format), the model loads with
``AutoModelForImageTextToText`` and TRL picks its ``DataCollatorForVisionPreference`` (tokenization and image
processing at collate time, every image twice per pair). The pairs' ids are compared with ours by running TRL's
own collator on each pair alone before training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lib import cuda_bf16_peak, feed_order, matmul_peak_flops  # noqa: E402  (stdlib-only module level)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--rows", required=True)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--precompute", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--peak-flops", type=float, default=None)
    args = p.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = args.device == "cuda"
    data = json.load(open(args.rows))
    records, ours, batches = data["records"], data["rows"], data["batches"]
    if any(len(b) != args.batch_size for b in batches) or len(batches) != args.warmup + args.steps:
        sys.exit(f"{args.rows}: the batch list does not hold {args.warmup + args.steps} batches of {args.batch_size}")
    vision = bool(data.get("vision"))
    dtype = torch.bfloat16 if cuda else torch.float32
    if vision:  # --shape vision: the processor, an image-text-to-text model, PIL images in the dataset
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor

        tok = AutoProcessor.from_pretrained(args.model_dir)
        model = AutoModelForImageTextToText.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="sdpa")

        def opened(path):
            with Image.open(path) as img:
                img.load()
                return img.copy()

        records = [{**r, "images": [opened(x) for x in r["images"]]} for r in records]
    else:
        tok = AutoTokenizer.from_pretrained(args.model_dir)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="sdpa")
    peak = None if cuda or args.peak_flops else matmul_peak_flops()

    class Timer(TrainerCallback):
        def __init__(self):
            self.starts, self.ends = [], []

        def on_step_begin(self, args_, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.starts.append(time.perf_counter())

        def on_step_end(self, args_, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    timer = Timer()
    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, max_steps=args.warmup + args.steps, learning_rate=1e-6, beta=0.1,
        loss_type=["sigmoid"], bf16=cuda, fp16=False, gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=not cuda, precompute_ref_log_probs=args.precompute, report_to=[], save_strategy="no",
        logging_steps=10, disable_tqdm=True, dataloader_num_workers=0, seed=args.seed, data_seed=args.seed,
        dataset_num_proc=None, train_sampling_strategy="sequential",  # the list's order, see the docstring
    )
    t_prep = time.perf_counter()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(feed_order(records, batches)),
                         processing_class=tok, callbacks=[timer])
    prep_seconds = time.perf_counter() - t_prep
    L = args.max_length  # TRL keeps full ids in the dataset and truncates (prompt + completion)[:L] when collating

    def key(prompt, chosen, rejected):
        return tuple(prompt), tuple(chosen[:L - len(prompt)]), tuple(rejected[:L - len(prompt)])

    mine = [key(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in ours]
    inner = trainer.data_collator
    if vision:
        # TRL tokenizes vision pairs in its collator (no token ids in its dataset): each pair's ids as TRL's own
        # collator makes them for that pair alone, keyed by the pair's text, before training (untimed)
        def text_key(e):  # the pair's texts and pixels (an example read back from the dataset, before collating)
            texts = [[part.get("text") for m in e[f] for part in (m["content"] if isinstance(m["content"], list)
                                                                  else [{"text": m["content"]}])]
                     for f in ("prompt", "chosen", "rejected")]
            pixels = [hashlib.sha1(img.convert("RGB").tobytes()).hexdigest() for img in e["images"]]
            return json.dumps([texts, pixels])

        by_text = {}
        for e in trainer.train_dataset:  # fresh dicts: TRL's collator may rewrite them
            k = text_key(e)
            one = inner([e])
            real = one["attention_mask"].bool()
            seqs = [one["input_ids"][i][real[i]].tolist() for i in range(2)]
            n_prompt = int((~one["completion_mask"][0][real[0]].bool()).sum())
            by_text[k] = key(seqs[0][:n_prompt], seqs[0][n_prompt:], seqs[1][n_prompt:])
        theirs = set(by_text.values())
    else:
        theirs = {key(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])
                  for r in trainer.train_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])}
    match = len(theirs & set(mine)) / max(len(mine), 1)

    # what each step trains on: the wrapped collator records the pairs' ids and the collated batch's positions
    seen: list[tuple[list, int, int]] = []

    def recording_collator(examples):
        keys = ([by_text[text_key(e)] for e in examples] if vision  # before TRL's collator rewrites the messages
                else [key(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples])
        batch = inner(examples)
        seen.append((keys, int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch

    trainer.data_collator = recording_collator
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = cuda_bf16_peak(args.peak_flops) if cuda else (args.peak_flops or max(peak, matmul_peak_flops()))
    w = args.warmup
    steps = len(timer.ends) - w
    # the dataloader may fetch one batch ahead of the step: the steps trained on the first len(ends) batches
    timed, expected = seen[w:w + steps], batches[w:w + steps]
    timed_ids = [[p if k == mine[p] else -1 for k, p in zip(keys, b)] for (keys, _, _), b in zip(timed, expected)]
    result = {
        "name": "trl_precompute" if args.precompute else "trl",
        "trl_version": __import__("trl").__version__,
        "steps": steps, "seconds": timer.ends[-1] - timer.starts[w],
        "pairs": sum(len(k) for k, _, _ in timed), "timed_ids": timed_ids,
        "batch_lengths": [[(len(k[0]), len(k[1]), len(k[2])) for k in keys] for keys, _, _ in timed],
        "processed_tokens": sum(t for _, t, _ in timed), "positions": sum(n for _, _, n in timed),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "matmul_peak_flops": None if cuda else peak, "peak_flops": peak if cuda else None,
        "setup_seconds": prep_seconds, "tokenization_match": match,
        "torch_threads": torch.get_num_threads(),
        "step_seconds": [e - s for s, e in zip(timer.starts[w:], timer.ends[w:])],
        "load_average_after": os.getloadavg(),
    }
    if cuda:
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["device_name"] = torch.cuda.get_device_name()
    print("BENCH_RESULT " + json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
