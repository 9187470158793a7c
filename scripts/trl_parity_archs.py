"""TRL parity, per architecture family: ``dpo-eval`` (default engine: prefix-shared layout, chunked head, probe)
against TRL 1.16's ``DPOTrainer.evaluate()`` on the same tiny policy / reference weights and pairs.

    TRL_SITE_PACKAGES=/path/to/trlenv/site-packages PYTHONPATH=. python scripts/trl_parity_archs.py  # every family
    ... python scripts/trl_parity_archs.py gemma2 mixtral                                              # some
(or run it with TRL's own python, as scripts/trl_parity.py).

Per family: policy (seed 0) and reference (seed 1) built from the family's tiny config with the built-in tiny
tokenizer's vocabulary, saved with ``save_pretrained``; 8 pairs of the embedded data, one batch of 8, sigmoid
loss, beta 0.1. Ours: ``dpo_lightning.evaluate.evaluate`` on the composed ``eval`` config (what ``dpo-eval``
runs). Checked (tests/test_trl_parity.py): policy log-probs (``logps/chosen``, ``logps/rejected``) within 1e-4
relative, loss (with the MoE router loss where TRL adds it) within 1e-3, identical reward accuracy.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRL_SITE_PACKAGES") and os.environ["TRL_SITE_PACKAGES"] not in sys.path:
    sys.path.append(os.environ["TRL_SITE_PACKAGES"])
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from arch_families import FAMILIES, build  # noqa: E402
from trl_parity import REPO  # noqa: E402  (importing it also sets up sys.path)

TOL_LOGPS, TOL_LOSS = 1e-4, 1e-3
KEYS = ("loss", "logps/chosen", "logps/rejected", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
        "aux_loss")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-8)


def save_pair(name: str, work: Path) -> tuple[str, str]:
    """The family's policy and reference, saved with the tiny tokenizer (fp32)."""
    from dpo_lightning.models.tiny import build_tokenizer

    tok = build_tokenizer()
    paths = []
    for seed, role in ((0, "policy"), (1, "reference")):
        folder = work / name / role
        model = build(name, len(tok), seed=seed)
        with torch.no_grad():  # random init of some families is tiny: widen it so the models differ clearly
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        paths.append(str(folder))
    return paths[0], paths[1]


def ours(pol: str, ref: str, data: str, work: Path) -> dict[str, float]:
    from hydra import compose, initialize_config_dir

    from dpo_lightning.cli.locate import config_dir
    from dpo_lightning.evaluate import evaluate

    overrides = ["model=hf", f"model.name_or_path={pol}", "model.dtype=float32", "model.attn_implementation=null",
                 f"reference.name_or_path={ref}", f"data.path={data}", "data.val_fraction=0", "split=all",
                 "data.batch_size=8", "data.max_length=64", "loss=sigmoid", "loss.beta=0.1", "trainer.accelerator=cpu",
                 "trainer.devices=1", f"paths.output_dir={work}", f"paths.cache_dir={work}/cache",
                 f"output_json={work}/eval.json"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides)
    metrics = evaluate(cfg)
    return {k.removeprefix("val/"): v for k, v in metrics.items()}


def trl(pol: str, ref: str, pairs: list[dict], work: Path) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(pol)
    args = DPOConfig(output_dir=str(work / "trl"), report_to=[], use_cpu=True, bf16=False, max_length=64,
                     per_device_eval_batch_size=8, per_device_train_batch_size=8, loss_type=["sigmoid"], beta=0.1)
    ds = Dataset.from_list(pairs)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(pol),
                         ref_model=AutoModelForCausalLM.from_pretrained(ref), args=args, train_dataset=ds,
                         eval_dataset=ds, processing_class=tok)
    return {k[5:]: float(v) for k, v in trainer.evaluate().items() if k.startswith("eval_")}


def compare(name: str, work: Path | None = None) -> dict:
    """TRL's and our metrics for family ``name`` and the worst relative differences."""
    work = Path(work or tempfile.mkdtemp(prefix=f"trl-arch-{name}-"))
    lines = (REPO / "dpo_lightning/assets/default_prefs.jsonl").read_text().splitlines()
    pairs = [json.loads(ln) for ln in lines[:8]]
    data = work / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in pairs))
    pol, ref = save_pair(name, work)
    mine, theirs = ours(pol, ref, str(data), work / "ours"), trl(pol, ref, pairs, work)
    return {"family": name, "ours": {k: mine.get(k) for k in KEYS}, "trl": {k: theirs.get(k) for k in KEYS},
            "logps": max(_rel(theirs[k], mine[k]) for k in ("logps/chosen", "logps/rejected")),
            "loss": _rel(theirs["loss"], mine["loss"]),
            "accuracy_equal": theirs["rewards/accuracies"] == mine["rewards/accuracies"],
            "aux": None if "aux_loss" not in theirs else _rel(theirs["aux_loss"], mine.get("aux_loss", 0.0))}


def main(names: list[str]) -> int:
    bad = 0
    print(f"{'family':<12} {'logps rel':>10} {'loss rel':>10} {'acc':>5} {'aux rel':>9}  TRL loss / ours")
    for name in names or list(FAMILIES):
        r = compare(name)
        ok = r["logps"] <= TOL_LOGPS and r["loss"] <= TOL_LOSS and r["accuracy_equal"]
        bad += not ok
        aux = "-" if r["aux"] is None else f"{r['aux']:.1e}"
        print(f"{name:<12} {r['logps']:>10.1e} {r['loss']:>10.1e} {str(r['accuracy_equal']):>5} {aux:>9}  "
              f"{r['trl']['loss']:.6f} / {r['ours']['loss']:.6f}{'' if ok else '  <-- MISMATCH'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
