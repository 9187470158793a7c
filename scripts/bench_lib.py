"""What every contender of ``scripts/benchmark.py`` shares: model shapes, the one list of timed batches, the
FLOP counts and the figures. Standard library only at module level: ``scripts/benchmark_trl.py`` imports it in
TRL's environment, ``tests/test_benchmark.py`` in ours.

The fair-comparison contract: the driver draws one seeded subset of pairs and one list of batches
(``timed_batches``); every run (ours, all-off, TRL, TRL with precomputed reference) trains on exactly that list,
in that order: warm-up batches first (untimed), then the timed ones. Our runs feed it to Lightning as a fixed
``batch_sampler`` (``our_batch_sampler``); TRL gets the pairs as a dataset in the list's order
(``feed_order``) with ``train_sampling_strategy="sequential"``, so its consecutive ``batch_size`` chunks are
the same batches. Every run reports the subset positions of the pairs it timed and the driver refuses to
compare runs whose timed pairs differ (``check_same_batches``).
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Llama shapes (vocabulary: the GPT-2 tokenizer's 50,257). ``small``: the CPU benchmark model of
# docs/performance.md; ``smollm2``: SmolLM2-135M's shape (tied embeddings); ``gpu05b``: ~0.4B for CUDA bf16;
# ``tiny``: seconds-long smoke runs and tests.
SHAPES = {
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, tie_word_embeddings=False),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, tie_word_embeddings=True),
    "gpu05b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                   num_key_value_heads=16, tie_word_embeddings=False),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),
}
# ``vision``: a tiny Qwen2-VL (``dpo_lightning.models.tiny_vlm``) whose text model is ``small``'s (hidden 256, 4
# layers, 8 heads, intermediate 1024, untied, the embedding and LM head resized to GPT-2's 50,257 rows like every
# other shape) with a 2-layer vision tower of width 128; the processor resizes each image to about 320 x 320
# pixels: 8-pixel patches merged 2 x 2, ~400 image tokens per image.
VISION_SHAPE = dict(family="qwen2_vl", image_size=320, vocab_size=50257,
                    text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                              num_key_value_heads=8),
                    vision=dict(vision_hidden_size=128, vision_num_hidden_layers=2, vision_num_attention_heads=4))
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


# ------------------------------------------------------------------ the data
def shared_data() -> Path | None:
    """The HH-RLHF pairs + GPT-2 tokenizer: ``$DPO_BENCH_DATA``, ../shared/data or ./shared/data."""
    for c in (os.environ.get("DPO_BENCH_DATA"), REPO.parent / "shared" / "data", REPO / "shared" / "data"):
        if c and (Path(c) / "gpt2-tokenizer" / "tokenizer.json").exists():
            return Path(c)
    return None


def data_source(kind: str) -> tuple[str, Path]:
    """(records file, tokenizer folder) of ``--data``: ``hh-rlhf`` (shared data) or ``builtin`` (the embedded
    short pairs and the built-in word-level tokenizer: the plumbing and the model shape where no data is)."""
    if kind == "builtin":
        from importlib import resources

        from dpo_lightning.models.tiny import materialize

        return str(resources.files("dpo_lightning.assets").joinpath("default_prefs.jsonl")), materialize()
    shared = shared_data()
    if shared is None:
        sys.exit("--data hh-rlhf needs ../shared/data (or $DPO_BENCH_DATA); --data builtin runs without it")
    return str(shared / "hh-rlhf-harmless-base-test.jsonl.gz"), shared / "gpt2-tokenizer"


# the generated vision pairs (``--shape vision``): coloured shapes on canvases of several sizes, 1 or 2 per pair
_COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (235, 220, 40),
            "purple": (140, 40, 180), "orange": (245, 140, 20), "black": (10, 10, 10), "white": (250, 250, 250)}
_SHAPES = ("circle", "square", "triangle")


def draw_shape(w: int, h: int, shape: str, colour: str, background: str):
    """A PIL image: a filled ``shape`` of ``colour`` on a ``background`` canvas of ``w`` x ``h`` pixels."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), _COLOURS[background])
    d = ImageDraw.Draw(img)
    box = (w // 5, h // 5, w - w // 5, h - h // 5)
    if shape == "circle":
        d.ellipse(box, fill=_COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=_COLOURS[colour])
    else:
        d.polygon([(w // 2, h // 5), (w - w // 5, h - h // 5), (w // 5, h - h // 5)], fill=_COLOURS[colour])
    return img


def vision_records(n: int, seed: int, folder: Path) -> list[dict]:
    """``n`` seeded vision pairs in TRL's format (an ``images`` column of PNG paths under ``folder``,
    conversational prompts with one ``{"type": "image"}`` part per image, one-word answers); one pair in three
    has two images."""
    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = list(_COLOURS)
    out = []
    for i in range(n):
        k = 2 if i % 3 == 2 else 1
        paths = []
        picked = []
        for j in range(k):
            shape, colour = rnd.choice(_SHAPES), rnd.choice(colours)
            background = rnd.choice([c for c in colours if c != colour])
            w, h = rnd.choice((64, 96, 128, 160, 224)), rnd.choice((64, 96, 128, 160, 224))
            path = folder / f"pair{i}-{j}.png"
            draw_shape(w, h, shape, colour, background).save(path)
            paths.append(str(path))
            picked.append((shape, colour))
        shape, colour = picked[0]
        wrong = rnd.choice([c for c in colours if c != colour])
        if k == 2:
            text, good, bad = "how many shapes are there ?", " two .", " three ."
        elif i % 2:
            text, good, bad = "what shape is in the image ?", f" a {shape} .", \
                f" a {rnd.choice([s for s in _SHAPES if s != shape])} ."
        else:
            text, good, bad = "what colour is the shape ?", f" {colour} .", f" {wrong} ."
        content = [{"type": "image"} for _ in range(k)] + [{"type": "text", "text": text}]
        out.append({"images": paths, "prompt": [{"role": "user", "content": content}],
                    "chosen": [{"role": "assistant", "content": [{"type": "text", "text": good}]}],
                    "rejected": [{"role": "assistant", "content": [{"type": "text", "text": bad}]}]})
    return out


# ------------------------------------------------------------------ the one list of batches
def timed_batches(lengths: list[int], batch_size: int, n_batches: int, seed: int,
                  order: str = "grouped") -> list[list[int]]:
    """``n_batches`` batches of ``batch_size`` positions into ``lengths`` (each position once).

    ``shuffled``: a seeded permutation cut into batches (what a plain random sampler does). ``grouped``: the
    same permutation, cut into mega-batches of 50 batches, each sorted by length (longest first) and cut into
    batches, the batch order then shuffled (what ``data.group_by_length`` does): less padding for every
    contender alike.
    """
    if order not in ("grouped", "shuffled"):
        raise ValueError(f"order={order!r}: use 'grouped' or 'shuffled'")
    need = batch_size * n_batches
    if need > len(lengths):
        raise ValueError(f"{n_batches} batches of {batch_size} need {need} pairs; only {len(lengths)} given")
    rnd = random.Random(seed)
    perm = rnd.sample(range(len(lengths)), need)
    if order == "grouped":
        mega = 50 * batch_size
        perm = [i for s in range(0, need, mega) for i in sorted(perm[s:s + mega], key=lambda i: -lengths[i])]
    batches = [perm[i:i + batch_size] for i in range(0, need, batch_size)]
    if order == "grouped":
        rnd.shuffle(batches)
    return batches


def our_batch_sampler(train_rows: list[dict], batches: list[list[int]]) -> list[list[int]]:
    """The batches as positions into the data module's ``train_rows`` (whose ``index`` is the subset position)."""
    where = {r["index"]: i for i, r in enumerate(train_rows)}
    missing = sorted({p for b in batches for p in b} - set(where))
    if missing:
        raise RuntimeError(f"pairs {missing[:5]} of the batch list were dropped by the data module")
    return [[where[p] for p in b] for b in batches]


def feed_order(records: list, batches: list[list[int]]) -> list:
    """The records in the list's order: consumed sequentially, ``batch_size`` at a time, they are the batches."""
    return [records[p] for b in batches for p in b]


def check_same_batches(runs: dict[str, dict], expected: list[list[int]]) -> None:
    """Every run must have timed exactly ``expected`` (subset positions, per batch, in order)."""
    for name, r in runs.items():
        if r["timed_ids"] != expected:
            raise RuntimeError(f"run {name!r} timed other pairs than the batch list: {r['timed_ids'][:2]} ... "
                               f"vs {expected[:2]} ...; the comparison would not be fair")


# ------------------------------------------------------------------ FLOPs
def model_shape(config: dict) -> dict:
    """Parameter counts of a Llama config: ``non_embedding_params`` (the decoder layers and the final norm)
    and ``matmul_params`` (those plus the LM head: the weights every token multiplies). A vision-language
    model's config: its text model's counts (the vision tower's FLOPs are not counted in either utilisation)."""
    config = config.get("text_config", config)
    H, V, nl, inter = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"], config[
        "intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or H // heads
    per_layer = H * heads * hd + 2 * H * kv * hd + heads * hd * H + 3 * H * inter + 2 * H
    non_emb = nl * per_layer + H
    tied = bool(config.get("tie_word_embeddings"))
    return {"H": H, "V": V, "layers": nl, "non_embedding_params": non_emb, "matmul_params": non_emb + V * H,
            "params": non_emb + (1 if tied else 2) * V * H, "tied_embeddings": tied}


def useful_flop_parts(pairs: list[tuple[int, int, int]], shape: dict, reference: bool) -> dict[str, float]:
    """The minimal computation of these pairs, prompt counted once (``benchmark.py``'s docstring), by kind:
    ``linear`` (the decoder's weight matmuls: linear in the tokens), ``lm_head`` (completion tokens only) and
    ``attention`` (scores and values: each token times the keys it sees, so quadratic in the length)."""
    N, H, V, nl = shape["non_embedding_params"], shape["H"], shape["V"], shape["layers"]
    k = 8 if reference else 6  # forward + backward of the policy (2 + 4), + the reference's forward (2)
    parts = {"linear": 0.0, "lm_head": 0.0, "attention": 0.0}
    for P, C, R in pairs:
        ctx = P * (P + 1) / 2 + C * P + C * (C + 1) / 2 + R * P + R * (R + 1) / 2
        parts["linear"] += k * N * (P + C + R)
        parts["lm_head"] += k * H * V * (C + R)
        parts["attention"] += (k // 2) * 4 * nl * H * ctx  # 3A (policy) + A (reference)
    return parts


def useful_flops(pairs: list[tuple[int, int, int]], shape: dict, reference: bool) -> float:
    """The minimal computation of these pairs, prompt counted once (``benchmark.py``'s docstring)."""
    return sum(useful_flop_parts(pairs, shape, reference).values())


def conventional_flops(processed_tokens: int, shape: dict, reference: bool) -> float:
    """6·N per processed token (+ 2·N for a live reference's forward), N = ``matmul_params``: the usual MFU
    numerator, every token the model ran over (prompt tokens as often as the layout computes them)."""
    return (6 + (2 if reference else 0)) * shape["matmul_params"] * processed_tokens


def matmul_peak_flops(n: int = 2048, reps: int = 10) -> float:
    """The best fp32 matmul rate of this process (the CPU 'peak')."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best


def cuda_bf16_peak(override: float | None = None) -> float | None:
    """The device's dense bf16 FLOP/s: ``override``, else Lightning's table (where Lightning is installed),
    else ``BF16_PEAK`` by device name, else None (no utilisation figures)."""
    import torch

    if override:
        return override
    try:
        from lightning.fabric.utilities.throughput import get_available_flops

        peak = get_available_flops(torch.device("cuda"), torch.bfloat16)
    except ImportError:  # TRL's environment
        peak = None
    name = torch.cuda.get_device_name()
    return peak or next((v for k, v in BF16_PEAK.items() if k in name), None)


# ------------------------------------------------------------------ figures
def summarize(r: dict, shape: dict, peak: float | None) -> dict:
    """Add the rates, token counts and both FLOP utilisations to one run's raw result."""
    pairs = [tuple(p) for b in r.pop("batch_lengths") for p in b]
    reference = not r["name"].endswith("precompute")
    s = r["seconds"]
    tokens = {"prompt": sum(p[0] for p in pairs), "chosen": sum(p[1] for p in pairs),
              "rejected": sum(p[2] for p in pairs)}
    tokens["pair_tokens"] = 2 * tokens["prompt"] + tokens["chosen"] + tokens["rejected"]
    tokens["unique_tokens"] = tokens["prompt"] + tokens["chosen"] + tokens["rejected"]
    tokens["processed_tokens"], tokens["positions"] = r.pop("processed_tokens"), r.pop("positions")
    parts = useful_flop_parts(pairs, shape, reference)
    useful, conventional = sum(parts.values()), conventional_flops(tokens["processed_tokens"], shape, reference)
    r.update({
        "pairs_per_s": r["pairs"] / s, "tokens_per_s": tokens["pair_tokens"] / s, "timed_tokens": tokens,
        "padding_fraction": 1 - tokens["processed_tokens"] / max(tokens["positions"], 1),
        "useful_tflops_per_step": useful / max(r["steps"], 1) / 1e12, "useful_flops_per_s": useful / s,
        "useful_flop_shares": {k: v / useful for k, v in parts.items()} if useful else None,
        "useful_flop_utilisation": useful / s / peak if peak else None,
        "mfu_conventional": conventional / s / peak if peak else None, "peak_flops_used": peak,
    })
    return r


def ratios(results: dict[str, dict]) -> dict[str, dict]:
    """ours / baseline for pairs/s, non-pad tokens/s and peak memory (equal pairs/s and tokens/s ratios are
    the check that both ran the same pairs)."""
    mem = "peak_gpu_mb" if any("peak_gpu_mb" in r for r in results.values()) else "peak_rss_mb"
    out = {}
    pairs = [(o, b) for o in ("ours", "ours_precompute") for b in ("ours_images_twice", "all_off", "trl",
                                                                    "trl_precompute")]
    for ours, base in pairs + [("ours_images_twice", "trl")]:
        if ours in results and base in results:
            a, b = results[ours], results[base]
            out[f"{ours}/{base}"] = {
                "pairs_per_s": a["pairs_per_s"] / b["pairs_per_s"],
                "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
                mem.replace("_mb", ""): a[mem] / b[mem] if a.get(mem) and b.get(mem) else None,
            }
    return out


def format_table(report: dict) -> str:
    """The report as the lines a person reads (``benchmark.py`` prints them to stderr after the JSON)."""
    m, runs = report["model"], report["runs"]
    first = next(iter(runs.values()))
    t = first["timed_tokens"]
    mem = "peak_gpu_mb" if report["device"] == "cuda" else "peak_rss_mb"
    lines = [
        f"== benchmark: {first.get('device_name', report['device'])}, shape {report['shape']} "
        f"({m['params'] / 1e6:.1f}M parameters, {m['matmul_params'] / 1e6:.1f}M per token), data {report['data']}, "
        f"{report['batch_size']} pairs/step, max_length {report['max_length']}",
        f"   {report['timed_steps']} timed steps after {report['warmup']} warm-up, {report['batches']} batches: the "
        f"same {first['pairs']} pairs for every run (prompt {t['prompt']}, chosen {t['chosen']}, rejected "
        f"{t['rejected']} tokens; {t['pair_tokens']} pair tokens, {t['unique_tokens']} with the prompt once)",
        f"   {'run':<16}{'pairs/s':>9}{'tokens/s':>10}{mem.replace('_', ' '):>13}{'useful-FLOP util':>18}"
        f"{'MFU (6N)':>10}{'padding':>9}{'processed':>11}",
    ]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    for name, x in runs.items():
        lines.append(f"   {name:<16}{x['pairs_per_s']:>9.2f}{x['tokens_per_s']:>10.0f}{x.get(mem) or 0:>13.0f}"
                     f"{pct(x['useful_flop_utilisation']):>18}{pct(x['mfu_conventional']):>10}"
                     f"{pct(x['padding_fraction']):>9}{x['timed_tokens']['processed_tokens']:>11}")
    for name, x in report["ratios"].items():
        memory = next((f"  memory {v:.2f}x" for k, v in x.items() if k.startswith("peak") and v), "")
        lines.append(f"   {name:<30} pairs/s {x['pairs_per_s']:.2f}x  tokens/s {x['tokens_per_s']:.2f}x{memory}")
    pre = runs.get("ours_precompute", {}).get("precompute_seconds")
    if pre is not None:
        lines.append(f"   one-time reference pass of ours_precompute: {pre:.1f} s")
    peak = first.get("peak_flops_used")
    lines.append(f"   peak FLOP/s used for both utilisations: {peak:.3g}" if peak else "   no peak FLOP/s: no MFU")
    return "\n".join(lines)


# ------------------------------------------------------------------ profiling (``--profile DIR``)
class StepProfiler:
    """``torch.profiler`` over a run's timed steps; ``stop`` writes the top operators by self time (and the same
    grouped by input shape) to ``<dir>/<run>.txt``. The profiler's own overhead slows the run: a profiled run's
    rates are not figures."""

    def __init__(self, folder: str, name: str, rows: int = 45):
        self.path, self.rows, self.prof = f"{folder}/{name}.txt", rows, None

    def start(self) -> None:
        import torch

        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=acts, record_shapes=True)
        self.prof.__enter__()

    def stop(self) -> None:
        import os

        if self.prof is None:
            return
        self.prof.__exit__(None, None, None)
        key = "self_cuda_time_total" if any(e.device_type.name == "CUDA" for e in self.prof.events()) \
            else "self_cpu_time_total"
        avg = self.prof.key_averages()
        text = (avg.table(sort_by=key, row_limit=self.rows, max_name_column_width=60) + "\n\nby input shape:\n"
                + self.prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=self.rows,
                                                                           max_name_column_width=60))
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "w") as f:
            f.write(text)
        self.prof = None
