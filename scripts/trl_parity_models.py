"""TRL parity, part 2: one tiny policy vs. one reference through TRL's trainers and through ours.

The built-in tiny Llama pair (policy seed 0, reference seed 1) on 8 rows of the embedded data. TRL:
``DPOTrainer.evaluate`` / ``KTOTrainer.evaluate`` (its own tokenization); the experimental ``CPOTrainer`` /
``ORPOTrainer`` ``get_batch_loss_metrics`` on a batch built from our token ids. Ours: ``PreferenceDataModule`` +
``PreferenceLitModule.compute_loss`` in eval mode. Run through ``scripts/trl_parity.py`` (tolerance 1e-4).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from trl_parity import REPO, _metric_diffs, case  # noqa: E402  (importing it also sets up sys.path)

from dpo_lightning.losses import get_loss  # noqa: E402
from dpo_lightning.training.module import PreferenceLitModule  # noqa: E402

MODEL_CASES = [
    case("sigmoid", {"beta": 0.1}, {"kind": "dpo", "loss_type": ["sigmoid"], "beta": 0.1}),
    case("ipo", {"beta": 0.1}, {"kind": "dpo", "loss_type": ["ipo"], "beta": 0.1}),
    case("hinge", {"beta": 0.1}, {"kind": "dpo", "loss_type": ["hinge"], "beta": 0.1}),
    case("sigmoid", {"beta": 0.1, "use_weighting": True, "ld_alpha": 0.5, "f_divergence_type": "js_divergence"},
         {"kind": "dpo", "loss_type": ["sigmoid"], "beta": 0.1, "use_weighting": True, "ld_alpha": 0.5,
          "f_divergence_type": "js_divergence"}, "sigmoid+wpo+ld0.5+js"),
    case("mpo", {"beta": 0.1}, {"kind": "dpo", "loss_type": ["sigmoid", "bco_pair", "sft"],
                                "loss_weights": [0.8, 0.2, 1.0], "beta": 0.1}),
    case("kto", {"beta": 0.1}, {"kind": "kto", "loss_type": "kto", "beta": 0.1}),
    case("apo_zero_unpaired", {"beta": 0.1}, {"kind": "kto", "loss_type": "apo_zero_unpaired", "beta": 0.1}),
    case("cpo", {"beta": 0.1, "cpo_alpha": 1.0}, {"kind": "cpo", "loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 1.0}),
    case("simpo", {"beta": 2.0, "gamma": 0.5, "cpo_alpha": 1.0},
         {"kind": "cpo", "loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 1.0}),
    case("orpo", {"beta": 0.1}, {"kind": "orpo", "beta": 0.1}),
]


def _legacy_batch(rows: list[dict], pad: int) -> dict:
    """TRL CPO/ORPO (legacy) batch from our token ids: prompt+completion, labels -100 on the prompt."""
    batch = {}
    for side in ("chosen", "rejected"):
        seqs = [r["prompt_ids"] + r[f"{side}_ids"] for r in rows]
        labels = [[-100] * len(r["prompt_ids"]) + r[f"{side}_ids"] for r in rows]
        L = max(map(len, seqs))
        batch[f"{side}_input_ids"] = torch.tensor([s + [pad] * (L - len(s)) for s in seqs])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
        batch[f"{side}_labels"] = torch.tensor([s + [-100] * (L - len(s)) for s in labels])
    return batch


def trl_model_metrics(c, pol: str, ref: str, pairs: list[dict], workdir: str, ours_rows: list[dict]):
    """TRL's loss and metrics for one case on the tiny models; also whether TRL tokenized as we did."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pol)
    load = AutoModelForCausalLM.from_pretrained
    common = dict(output_dir=workdir, report_to=[], use_cpu=True, bf16=False, per_device_eval_batch_size=8,
                  per_device_train_batch_size=8, max_length=64)
    cfg = {k: v for k, v in c.trl.items() if k != "kind"}
    kind = c.trl["kind"]
    if kind in ("dpo", "kto"):
        if kind == "dpo":
            from trl import DPOConfig as Config
            from trl import DPOTrainer as Trainer

            ds = Dataset.from_list(pairs)
        else:
            from trl import KTOConfig as Config
            from trl import KTOTrainer as Trainer

            from dpo_lightning.data.formats import pairs_to_unpaired

            ds = Dataset.from_list(pairs_to_unpaired(pairs))
        trainer = Trainer(model=load(pol), ref_model=load(ref), args=Config(**common, **cfg), train_dataset=ds,
                          eval_dataset=ds, processing_class=tok)
        keys = ("prompt_ids", "chosen_ids", "rejected_ids") if kind == "dpo" else ("prompt_ids", "completion_ids")
        same = all(trainer.eval_dataset[i][k] == ours_rows[i][k] for i in range(len(ours_rows)) for k in keys)
        m = trainer.evaluate()
        metrics = {k[5:]: float(v) for k, v in m.items() if k.startswith("eval_")}
        return metrics, same
    if kind == "cpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    ds = Dataset.from_list(pairs)
    trainer = Trainer(model=load(pol), args=Config(**common, **cfg), train_dataset=ds, eval_dataset=ds,
                      processing_class=tok)
    trainer.model.eval()
    with torch.no_grad():
        loss, m = trainer.get_batch_loss_metrics(trainer.model, _legacy_batch(ours_rows, tok.pad_token_id), "eval")
    metrics = {k.removeprefix("eval_"): float(v) for k, v in m.items()}
    metrics["loss"] = float(loss)
    return metrics, True  # fed our own token ids


def part2() -> list[dict]:
    import json
    import tempfile

    from dpo_lightning import ModelSpec, PreferenceDataModule
    from dpo_lightning.models.tiny import materialize

    pol, ref = str(materialize(seed=0)), str(materialize(seed=1))  # this order gives KTO a positive KL
    lines = (REPO / "dpo_lightning/assets/default_prefs.jsonl").read_text().splitlines()
    pairs = [json.loads(ln) for ln in lines[:8]]
    work = tempfile.mkdtemp(prefix="trl-parity-")
    (Path(work) / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    (Path(work) / "half.jsonl").write_text("\n".join(json.dumps(p) for p in pairs[:4]))
    rows = []
    for c in MODEL_CASES:
        loss = get_loss(c.name, **c.ours)
        data = "pairs.jsonl" if loss.paired else "half.jsonl"  # unpaired: 4 pairs -> 8 rows, one batch
        dm = PreferenceDataModule(str(Path(work) / data), ModelSpec(pol), batch_size=8, max_length=64,
                                  paired=loss.paired, kl_pairs=loss.needs_kl_pairs, cache_dir=work)
        dm.setup("fit")
        batch = dm.collator()(dm.train_rows)
        module = PreferenceLitModule(ModelSpec(pol), loss=loss,
                                     reference={"name_or_path": ref} if loss.requires_reference else None)
        module.eval()
        with torch.no_grad():
            _, mine = module.compute_loss(batch)
        mine = {k: float(v) for k, v in mine.items()}
        trl, same = trl_model_metrics(c, pol, ref, pairs[:4] if not loss.paired else pairs, work, dm.train_rows)
        worst, key, by_design, missing = _metric_diffs(trl, mine, c.name)
        info = [f"TRL kl={trl['kl']:.3g}"] if "kl" in trl else []  # a clamped (0) KL would test less
        rows.append({"case": c.label, "metric": worst, "metric_key": key, "by_design": by_design, "info": info,
                     "missing": missing, "tokens_equal": same, "loss": (trl.get("loss"), mine["loss"])})
    return rows


