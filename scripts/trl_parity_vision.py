"""TRL parity for vision-language models: ``dpo-eval`` (images once per pair in the default ``prefix_shared``
layout; twice in ``data.layout=plain``, TRL's) against TRL 1.16's ``DPOTrainer.evaluate()`` on the same tiny
image-text-to-text policy / reference and the same pairs with images.

    TRL_SITE_PACKAGES=/path/to/trlenv/site-packages PYTHONPATH=. python scripts/trl_parity_vision.py          # default families
    ... python scripts/trl_parity_vision.py llava qwen2_vl                                                    # some
    ... python scripts/trl_parity_vision.py --layouts plain                                                   # one layout

Per family: policy (seed 0) and reference (seed 1) from ``tiny_vlm.build`` (every weight nudged by 0.02 * noise,
as ``trl_parity_archs.py`` does, so the two differ clearly), saved with their processor; 8 pairs over generated
PNG images (coloured shapes on several canvas sizes; one row with two images, one text-only row where the family
takes it), TRL's vision format: an ``images`` column and conversational prompts with ``{"type": "image"}`` parts.
TRL gets the images as PIL images (opened from the PNG files), ours reads the same files by path from the JSONL.
One batch of 8, sigmoid loss, beta 0.1, no truncation (TRL ``max_length=None``, ours a limit no row reaches).
Checked (tests/test_trl_parity.py): policy log-probs (``logps/chosen``, ``logps/rejected``) within 1e-4 relative,
loss within 1e-3, identical reward accuracy, in each layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRL_SITE_PACKAGES") and os.environ["TRL_SITE_PACKAGES"] not in sys.path:
    sys.path.append(os.environ["TRL_SITE_PACKAGES"])
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_lib import draw_shape  # noqa: E402  (the benchmark's drawing: one shape on a canvas)
from trl_parity import REPO  # noqa: E402, F401  (importing it also sets up sys.path)

TOL_LOGPS, TOL_LOSS = 1e-4, 1e-3
KEYS = ("loss", "logps/chosen", "logps/rejected", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
LAYOUTS = ("prefix_shared", "plain")
# the families that match TRL 1.16 here (measured; docs/performance.md, "Vision: TRL parity"). Left out:
# PaliGemma (TRL cannot evaluate it: its processor refuses TRL's text-only completion calls), LLaVA-OneVision
# (ours differs from TRL by ~9e-4 relative in both layouts) and InternVL (our evaluation fails), see the report.
FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "gemma3", "mistral3",
            "aya_vision")
# families whose processor refuses a batch mixing rows with and without images (the text-only row is left out)
NO_TEXT_ONLY: set[str] = set()  # none so far: every family above takes the mix
MAX_LENGTH = 4096  # ours: no row comes near it (TRL: max_length=None)

# (canvas width, height, shape, colour, background) per image
IMAGES = [(64, 64, "circle", "red", "white"), (96, 48, "square", "blue", "white"), (40, 80, "triangle", "green", "black"),
          (128, 128, "circle", "yellow", "blue"), (72, 56, "square", "purple", "white"), (48, 48, "triangle", "orange", "white"),
          (112, 80, "circle", "black", "yellow"), (56, 96, "square", "white", "red"), (80, 80, "triangle", "blue", "yellow")]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-8)


def _msg(role: str, text: str, images: int = 0) -> list[dict]:
    parts = [{"type": "image"} for _ in range(images)]
    return [{"role": role, "content": [*parts, {"type": "text", "text": text}]}]


def make_rows(work: Path, text_only: bool = True) -> list[dict]:
    """8 vision pairs (TRL's format, images as PNG paths relative to ``work``): one image per row, one row with
    two, and (``text_only``) one row with none."""
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, spec in enumerate(IMAGES):
        path = work / f"image{k}.png"
        draw_shape(*spec).save(path)
        paths.append(path.name)
    other = {"red": "blue", "blue": "red", "green": "purple", "yellow": "black", "purple": "orange",
             "orange": "green", "black": "white", "white": "yellow"}
    rows = []
    for k in range(7):
        _, _, shape, colour, _ = IMAGES[k]
        if k % 2:
            prompt, good, bad = "what shape is in the image ?", f" a {shape} .", " a square ." if shape != "square" else " a circle ."
        else:
            prompt, good, bad = "what colour is the shape ?", f" {colour} .", f" {other[colour]} ."
        rows.append({"images": [paths[k]], "prompt": _msg("user", prompt, 1),
                     "chosen": _msg("assistant", good), "rejected": _msg("assistant", bad)})
    # two images in one prompt
    rows[5] = {"images": [paths[5], paths[7]], "prompt": _msg("user", "how many shapes are there ?", 2),
               "chosen": _msg("assistant", " two ."), "rejected": _msg("assistant", " three .")}
    if text_only:
        rows.append({"images": [], "prompt": _msg("user", "what colour is the image ?"),
                     "chosen": _msg("assistant", " it is red ."), "rejected": _msg("assistant", " green .")})
    else:
        rows.append({"images": [paths[8]], "prompt": _msg("user", "what colour is the shape ?", 1),
                     "chosen": _msg("assistant", " blue ."), "rejected": _msg("assistant", " yellow .")})
    return rows


def save_pair(family: str, work: Path) -> tuple[str, str]:
    """The family's policy (seed 0) and reference (seed 1), nudged apart, saved with the processor (fp32)."""
    from dpo_lightning.models import tiny_vlm

    paths = []
    for seed, role in ((0, "policy"), (1, "reference")):
        folder = work / family / role
        model, processor = tiny_vlm.build(family, seed=seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        paths.append(str(folder))
    return paths[0], paths[1]


def ours(pol: str, ref: str, data: str, work: Path, layout: str | None = None) -> dict[str, float]:
    from hydra import compose, initialize_config_dir

    from dpo_lightning.cli.locate import config_dir
    from dpo_lightning.evaluate import evaluate

    overrides = ["model=hf", f"model.name_or_path={pol}", "model.dtype=float32", "model.attn_implementation=null",
                 f"reference.name_or_path={ref}", f"data.path={data}", "data.val_fraction=0", "split=all",
                 "data.batch_size=8", f"data.max_length={MAX_LENGTH}", "loss=sigmoid", "loss.beta=0.1",
                 "trainer.accelerator=cpu", "trainer.devices=1", f"paths.output_dir={work}",
                 f"paths.cache_dir={work}/cache", f"output_json={work}/eval.json"]
    if layout:
        overrides.append(f"data.layout={layout}")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides)
    metrics = evaluate(cfg)
    return {k.removeprefix("val/"): v for k, v in metrics.items()}


def trl_rows(rows: list[dict], base: Path) -> list[dict]:
    """``rows`` with each image path opened as a PIL image (TRL takes images, not paths)."""
    from PIL import Image

    def load(name: str):
        with Image.open(base / name) as img:
            img.load()
            return img.copy()

    return [{**r, "images": [load(p) for p in r["images"]]} for r in rows]


def trl(pol: str, ref: str, rows: list[dict], work: Path) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    processor = AutoProcessor.from_pretrained(pol)
    args = DPOConfig(output_dir=str(work / "trl"), report_to=[], use_cpu=True, bf16=False, max_length=None,
                     per_device_eval_batch_size=8, per_device_train_batch_size=8, loss_type=["sigmoid"], beta=0.1)
    ds = Dataset.from_list(rows)
    trainer = DPOTrainer(model=AutoModelForImageTextToText.from_pretrained(pol),
                         ref_model=AutoModelForImageTextToText.from_pretrained(ref), args=args, train_dataset=ds,
                         eval_dataset=ds, processing_class=processor)
    return {k[5:]: float(v) for k, v in trainer.evaluate().items() if k.startswith("eval_")}


def compare(family: str, work: Path | None = None, layouts: tuple[str, ...] = LAYOUTS) -> dict:
    """TRL's metrics and ours in each layout for ``family``, with the worst relative differences."""
    work = Path(work or tempfile.mkdtemp(prefix=f"trl-vision-{family}-"))
    data_dir = work / "data"
    rows = make_rows(data_dir, text_only=family not in NO_TEXT_ONLY)
    data = data_dir / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pol, ref = save_pair(family, work)
    theirs = trl(pol, ref, trl_rows(rows, data_dir), work)
    out: dict = {"family": family, "trl": {k: theirs.get(k) for k in KEYS}, "layouts": {}}
    for layout in layouts:
        mine = ours(pol, ref, str(data), work / f"ours-{layout}", layout)
        out["layouts"][layout] = {
            "ours": {k: mine.get(k) for k in KEYS},
            "logps": max(_rel(theirs[k], mine[k]) for k in ("logps/chosen", "logps/rejected")),
            "loss": _rel(theirs["loss"], mine["loss"]),
            "accuracy_equal": theirs["rewards/accuracies"] == mine["rewards/accuracies"]}
    return out


def ok(r: dict) -> bool:
    return r["logps"] <= TOL_LOGPS and r["loss"] <= TOL_LOSS and r["accuracy_equal"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--json", help="write every result to this file")
    a = ap.parse_args(argv)
    bad, results = 0, []
    print(f"{'family':<12} {'layout':<14} {'logps rel':>10} {'loss rel':>10} {'acc':>5}  "
          "TRL chosen / ours, TRL loss / ours")
    for family in a.families:
        try:
            r = compare(family, layouts=tuple(a.layouts))
        except Exception as err:  # a family that cannot run is reported, not fatal to the others
            bad += 1
            print(f"{family:<12} failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            results.append({"family": family, "error": f"{type(err).__name__}: {err}"})
            continue
        results.append(r)
        t = r["trl"]
        for layout, lr in r["layouts"].items():
            good = ok(lr)
            bad += not good
            o = lr["ours"]
            print(f"{family:<12} {layout:<14} {lr['logps']:>10.1e} {lr['loss']:>10.1e} {str(lr['accuracy_equal']):>5}  "
                  f"{t['logps/chosen']:.5f} / {o['logps/chosen']:.5f}, {t['loss']:.6f} / {o['loss']:.6f}"
                  f"{'' if good else '  <-- MISMATCH'}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
