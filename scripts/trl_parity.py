"""Parity of dpo_lightning's losses with TRL 1.16, measured, not assumed.

    PYTHONPATH=. /work/trlenv/bin/python scripts/trl_parity.py            # both parts, prints two tables
    PYTHONPATH=. /work/trlenv/bin/python scripts/trl_parity.py --no-model # log-prob level only

Part 1 (log-prob level, tolerance 1e-5): random per-token log-probs for B pairs (or unpaired rows with KL rows)
go through TRL's own code and through ours. TRL: ``DPOTrainer._compute_loss`` / ``KTOTrainer._compute_loss``
on a stub trainer (no __init__) with a stub model returning those per-token log-probs as its fused-LM-head
output and precomputed reference log-probs; ``ORPOTrainer.odds_ratio_loss`` / ``CPOTrainer.cpo_loss`` called
directly. Ours: ``PreferenceLitModule.compute_loss`` (module metrics + ``inputs.build_inputs`` + the registry
loss) on the same tokens. Per-example losses and rewards come from one-example batches on TRL's side (the
KL rows stay the full batch for KTO); batch loss and metrics from the full batch. Losses TRL does not have
(BCO: no BCOTrainer in TRL 1.16) are listed as n/a.

Part 2 (one tiny policy vs. one reference, tolerance 1e-4): the built-in tiny Llama pair (policy seed 0,
reference seed 1) on 8 rows of the embedded data. TRL: ``DPOTrainer.evaluate`` / ``KTOTrainer.evaluate``
(its own tokenization); the experimental ``CPOTrainer`` / ``ORPOTrainer`` ``get_batch_loss_metrics`` on a
batch built from our token ids (their legacy tokenizer adds a BOS our/TRL-DPO tokenization does not).
Ours: ``PreferenceDataModule`` + ``PreferenceLitModule.compute_loss`` in eval mode.

Runs under TRL's environment; when ``lightning`` is missing there, the repo's ``.venv`` site-packages are
appended to ``sys.path`` (same torch/transformers versions; set ``DPO_LIGHTNING_SITE`` to override).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]


def _ensure_paths() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import lightning  # noqa: F401
    except ImportError:
        site = os.environ.get("DPO_LIGHTNING_SITE") or next(iter(glob.glob(str(REPO / ".venv/lib/python*/site-packages"))), None)
        if site:
            sys.path.append(site)


_ensure_paths()

import torch  # noqa: E402

from dpo_lightning.engine.logprobs import SeqLogps  # noqa: E402
from dpo_lightning.losses import get_loss  # noqa: E402
from dpo_lightning.training.module import PreferenceLitModule  # noqa: E402

TOL_LOGPS, TOL_MODEL = 1e-5, 1e-4
NOT_IN_TRL = {"bco": "TRL 1.16 has no BCOTrainer"}
# metrics that differ from TRL by design (documented in docs/losses.md): key -> reason
BY_DESIGN = {
    ("orpo", "loss"): "TRL ORPO's NLL includes prompt tokens", ("orpo", "nll_loss"): "TRL ORPO's NLL includes prompt tokens",
    ("orpo", "logits/chosen"): "TRL CPO/ORPO average logits over all positions",
    ("orpo", "logits/rejected"): "same", ("cpo", "logits/chosen"): "same", ("cpo", "logits/rejected"): "same",
    ("simpo", "logits/chosen"): "same", ("simpo", "logits/rejected"): "same",
}


# ---------------------------------------------------------------------------- cases
def dpo(types, weights=None, **kw):
    return {"kind": "dpo", "loss_types": types, "loss_weights": weights or [1.0] * len(types), **kw}


def case(name, ours=None, trl=None, label=None):
    return SimpleNamespace(name=name, ours=ours or {}, trl=trl, label=label or name)


B3 = 0.3
CASES = [
    case("sigmoid", {"beta": B3}, dpo(["sigmoid"], beta=B3)),
    case("sigmoid", {"beta": B3, "f_divergence_type": "forward_kl"}, dpo(["sigmoid"], beta=B3, f_divergence_type="forward_kl"), "sigmoid+forward_kl"),
    case("sigmoid", {"beta": B3, "f_divergence_type": "js_divergence"}, dpo(["sigmoid"], beta=B3, f_divergence_type="js_divergence"), "sigmoid+js"),
    case("sigmoid", {"beta": B3, "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
         dpo(["sigmoid"], beta=B3, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3), "sigmoid+alpha0.3"),
    case("sigmoid", {"beta": B3, "use_weighting": True}, dpo(["sigmoid"], beta=B3, use_weighting=True), "sigmoid+wpo"),
    case("sigmoid", {"beta": B3, "ld_alpha": 0.5}, dpo(["sigmoid"], beta=B3, ld_alpha=0.5), "sigmoid+ld0.5"),
    case("sigmoid_norm", {"beta": 2.0}, dpo(["sigmoid_norm"], beta=2.0)),
    case("hinge", {"beta": B3}, dpo(["hinge"], beta=B3)),
    case("hinge", {"beta": B3, "f_divergence_type": "js_divergence"}, dpo(["hinge"], beta=B3, f_divergence_type="js_divergence"), "hinge+js"),
    case("ipo", {"beta": B3}, dpo(["ipo"], beta=B3)),
    case("ipo", {"beta": B3, "f_divergence_type": "forward_kl", "use_weighting": True},
         dpo(["ipo"], beta=B3, f_divergence_type="forward_kl", use_weighting=True), "ipo+forward_kl+wpo"),
    case("robust", {"beta": B3, "label_smoothing": 0.2}, dpo(["robust"], beta=B3, label_smoothing=0.2)),
    case("exo_pair", {"beta": B3, "label_smoothing": 1e-3}, dpo(["exo_pair"], beta=B3, label_smoothing=1e-3)),
    case("discopop", {"beta": B3, "discopop_tau": 0.05}, dpo(["discopop"], beta=B3, discopop_tau=0.05)),
    case("nca_pair", {"beta": B3}, dpo(["nca_pair"], beta=B3)),
    case("bco_pair", {"beta": B3}, dpo(["bco_pair"], beta=B3)),
    case("sppo_hard", {"beta": B3}, dpo(["sppo_hard"], beta=B3)),
    case("aot", {"beta": B3, "label_smoothing": 0.1}, dpo(["aot"], beta=B3, label_smoothing=0.1)),
    case("aot_unpaired", {"beta": B3, "label_smoothing": 0.1}, dpo(["aot_unpaired"], beta=B3, label_smoothing=0.1)),
    case("apo_zero", {"beta": B3}, dpo(["apo_zero"], beta=B3)),
    case("apo_down", {"beta": B3}, dpo(["apo_down"], beta=B3)),
    case("sft", {"beta": B3}, dpo(["sft"], beta=B3)),  # TRL 1.16 raises for sft + use_weighting
    case("mpo", {"beta": B3}, dpo(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], beta=B3)),
    case("rpo", {"beta": B3, "rpo_alpha": 0.5, "ld_alpha": 0.3}, dpo(["sigmoid", "sft"], [1.0, 0.5], beta=B3, ld_alpha=0.3), "rpo+ld0.3"),
    case("combination", {"losses": ["hinge", "ipo", "discopop"], "weights": [0.3, 0.7, 0.5], "beta": B3,
                         "f_divergence_type": "js_divergence"},
         dpo(["hinge", "ipo", "discopop"], [0.3, 0.7, 0.5], beta=B3, f_divergence_type="js_divergence"),
         "combination(hinge,ipo,discopop)+js"),
    case("kto", {"beta": B3, "desirable_weight": 1.3, "undesirable_weight": 0.7},
         {"kind": "kto", "loss_type": "kto", "beta": B3, "desirable_weight": 1.3, "undesirable_weight": 0.7}),
    case("apo_zero_unpaired", {"beta": B3}, {"kind": "kto", "loss_type": "apo_zero_unpaired", "beta": B3,
                                             "desirable_weight": 1.0, "undesirable_weight": 1.0}),
    case("orpo", {"beta": B3}, {"kind": "orpo", "beta": B3}),
    case("cpo", {"beta": B3, "label_smoothing": 0.1, "cpo_alpha": 0.5},
         {"kind": "cpo", "loss_type": "sigmoid", "beta": B3, "label_smoothing": 0.1, "cpo_alpha": 0.5, "alpha": 0.0, "simpo_gamma": 0.0}),
    case("simpo", {"beta": 2.0, "gamma": 0.8, "cpo_alpha": 0.3},
         {"kind": "cpo", "loss_type": "simpo", "beta": 2.0, "label_smoothing": 0.0, "cpo_alpha": 0.3, "alpha": 0.0, "simpo_gamma": 0.8}),
    case("alphapo", {"beta": 2.0, "gamma": 0.5, "alpha": 0.3},
         {"kind": "cpo", "loss_type": "simpo", "beta": 2.0, "label_smoothing": 0.0, "cpo_alpha": 0.0, "alpha": 0.3, "simpo_gamma": 0.5}),
    case("bco", {"beta": B3}, None),
]


# ---------------------------------------------------------------------------- synthetic log-probs
def synth(n_seq: int, gen: torch.Generator, max_len: int = 12) -> list[dict]:
    """n_seq sequences: per-token log-probs (<= 0), log sum_v p_v^2, mean logits, reference sum."""
    def dyadic(t):  # multiples of 2^-10: every sum is exact in fp32, so TRL's padded-row sums and our
        return torch.round(t * 1024) / 1024  # index_add give bit-identical per-sequence log-probs

    out = []
    for _ in range(n_seq):
        n = int(torch.randint(1, max_len + 1, (1,), generator=gen))
        tok = dyadic(-torch.rand(n, generator=gen) * 3)
        out.append({"tok": tok, "sq": dyadic(-torch.rand(n, generator=gen) * 2 - 0.5),
                    "mean_logit": dyadic(torch.randn(n, generator=gen)),
                    "ref": float(dyadic(tok.sum() + torch.randn(1, generator=gen) * 2))})
    return out


def trl_tensors(seqs: list[dict], prompt_len: int = 3) -> dict:
    """Plain-layout tensors for TRL: input ids, masks and the fused-head outputs (zero off the completion)."""
    L = prompt_len + max(len(s["tok"]) for s in seqs)
    n = len(seqs)
    comp = torch.zeros(n, L, dtype=torch.long)
    attn = torch.zeros(n, L, dtype=torch.long)
    outs = {k: torch.zeros(n, L - 1) for k in ("log_probs", "log_sum_sq_probs", "mean_logits", "entropy")}
    for i, s in enumerate(seqs):
        k = len(s["tok"])
        attn[i, : prompt_len + k] = 1
        comp[i, prompt_len: prompt_len + k] = 1
        outs["log_probs"][i, prompt_len - 1: prompt_len - 1 + k] = s["tok"]
        outs["log_sum_sq_probs"][i, prompt_len - 1: prompt_len - 1 + k] = s["sq"]
        outs["mean_logits"][i, prompt_len - 1: prompt_len - 1 + k] = s["mean_logit"]
    ids = torch.arange(n * L).reshape(n, L) % 50 + 5
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp, "outputs": outs}


def seq_logps(seqs: list[dict]) -> SeqLogps:
    """Our ``SeqLogps`` for the same sequences."""
    tok = torch.cat([s["tok"] for s in seqs])
    seq = torch.cat([torch.full((len(s["tok"]),), i) for i, s in enumerate(seqs)])
    pos = torch.cat([torch.arange(1, len(s["tok"]) + 1) for s in seqs])
    lengths = torch.tensor([len(s["tok"]) for s in seqs])
    logps = torch.zeros(len(seqs)).index_add(0, seq, tok)
    logits_sum = torch.tensor([float(s["mean_logit"].sum()) for s in seqs])
    return SeqLogps(logps, lengths, tok, seq, pos, logits_sum, torch.cat([s["sq"] for s in seqs]))


class StubLM:
    """Stands in for the policy: returns preset fused-LM-head outputs for the input_ids tensor it is given."""

    training = False

    def __init__(self):
        self.table = {}

    def add(self, tensors: dict) -> None:
        o = tensors["outputs"]
        self.table[id(tensors["input_ids"])] = SimpleNamespace(
            log_probs=o["log_probs"], log_sum_sq_probs=o["log_sum_sq_probs"], mean_logits=o["mean_logits"],
            entropy=o["entropy"], is_top1=torch.zeros_like(o["log_probs"], dtype=torch.bool), aux_loss=None)

    def __call__(self, input_ids=None, **_):
        return self.table[id(input_ids)]


_ACC = None


def accelerator():
    global _ACC
    if _ACC is None:
        from accelerate import Accelerator

        _ACC = Accelerator(cpu=True)
    return _ACC


def _stub_trainer(cls, **attrs):
    t = cls.__new__(cls)
    t.__dict__.update(accelerator=accelerator(), precompute_ref_logps=True, aux_loss_enabled=False,
                      _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                      _tp_size=1, model=SimpleNamespace(training=False),
                      args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=attrs.pop("discopop_tau", 0.05)),
                      **attrs)
    return t


def trl_paired(cfg: dict, chosen: list[dict], rejected: list[dict]) -> tuple[float, dict[str, float]]:
    """TRL DPOTrainer._compute_loss on the stub: (loss, eval metrics)."""
    from trl import DPOTrainer

    t = _stub_trainer(DPOTrainer, beta=cfg["beta"], loss_types=cfg["loss_types"], loss_weights=cfg["loss_weights"],
                      ld_alpha=cfg.get("ld_alpha"), f_divergence_type=cfg.get("f_divergence_type", "reverse_kl"),
                      f_alpha_divergence_coef=cfg.get("f_alpha_divergence_coef", 0.5),
                      label_smoothing=cfg.get("label_smoothing", 0.0), use_weighting=cfg.get("use_weighting", False),
                      discopop_tau=cfg.get("discopop_tau", 0.05))
    tensors = trl_tensors(chosen + rejected)
    model = StubLM()
    model.add(tensors)
    inputs = {k: tensors[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    ld = cfg.get("ld_alpha")  # TRL caches the LD-weighted reference: shared + ld_alpha * tail
    scale = 1.0 if ld is None else 0.6 + ld * 0.4
    inputs["ref_chosen_logps"] = torch.tensor([s["ref"] for s in chosen]) * scale
    inputs["ref_rejected_logps"] = torch.tensor([s["ref"] for s in rejected]) * scale
    loss = t._compute_loss(model, inputs, False)
    return float(loss), {k: float(v[-1]) for k, v in t._metrics["eval"].items()}


def trl_unpaired(cfg: dict, rows: list[dict], labels: list[bool], kl_rows: list[dict]) -> tuple[float, dict]:
    """TRL KTOTrainer._compute_loss on the stub; ``kl_rows`` may be longer than ``rows`` (per-example runs)."""
    from trl import KTOTrainer

    calc = cfg["loss_type"] == "kto"
    t = _stub_trainer(KTOTrainer, beta=cfg["beta"], loss_type=cfg["loss_type"], calculate_KL=calc,
                      desirable_weight=cfg["desirable_weight"], undesirable_weight=cfg["undesirable_weight"])
    main, kl = trl_tensors(rows), trl_tensors(kl_rows)
    model = StubLM()
    model.add(main)
    model.add(kl)
    inputs = {k: main[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    inputs.update({"KL_" + k: kl[k] for k in ("input_ids", "attention_mask", "completion_mask")})
    inputs["label"] = torch.tensor(labels)
    inputs["ref_logps"] = torch.tensor([s["ref"] for s in rows])
    inputs["ref_KL_logps"] = torch.tensor([s["ref"] for s in kl_rows])
    loss = t._compute_loss(model, inputs, False)
    return float(loss), {k: float(v[-1]) for k, v in t._metrics["eval"].items()}


def trl_reference_free(cfg: dict, chosen: list[dict], rejected: list[dict]):
    """TRL ORPO/CPO loss methods on averaged (or summed) log-probs: (per-example losses, rewards, metrics)."""
    avg = cfg["kind"] == "orpo" or cfg.get("loss_type") == "simpo"
    red = (lambda s: s["tok"].sum() / len(s["tok"])) if avg else (lambda s: s["tok"].sum())
    c, r = torch.stack([red(s) for s in chosen]), torch.stack([red(s) for s in rejected])
    nll = -torch.cat([s["tok"] for s in chosen]).mean()
    me = SimpleNamespace(accelerator=accelerator(), **{k: v for k, v in cfg.items() if k != "kind"})
    if cfg["kind"] == "orpo":
        from trl.experimental.orpo import ORPOTrainer

        losses, cr, rr, ratio, log_odds = ORPOTrainer.odds_ratio_loss(me, c, r)
        per = nll - losses
        metrics = {"nll_loss": float(nll), "log_odds_ratio": float(ratio), "log_odds_chosen": float(log_odds)}
    else:
        from trl.experimental.cpo import CPOTrainer

        losses, cr, rr = CPOTrainer.cpo_loss(me, c, r)
        per = losses + cfg["cpo_alpha"] * nll
        metrics = {"nll_loss": float(nll)}
    metrics.update({"loss": float(per.mean()), "rewards/chosen": float(cr.mean()), "rewards/rejected": float(rr.mean()),
                    "rewards/accuracies": float((cr > rr).float().mean()), "rewards/margins": float((cr - rr).mean()),
                    "logps/chosen": float(c.mean()), "logps/rejected": float(r.mean())})
    return per, cr, rr, metrics


def ours(loss, seqs: list[dict], batch: dict):
    """PreferenceLitModule.compute_loss on a stub module whose policy returns ``seqs`` (no reference run)."""
    me = SimpleNamespace(policy_logps=lambda b: seq_logps(seqs), reference_logps=lambda b: None, loss_fn=loss,
                         loss_state={}, verify_engine=lambda: None, verify_images=lambda batch: None)  # log-probs given
    me._compute = lambda b: PreferenceLitModule._compute(me, b)  # type: ignore[attr-defined]
    out, metrics = PreferenceLitModule.compute_loss(me, batch)
    return out, {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------- part 1: log-prob level
# TRL-only diagnostics and Trainer bookkeeping (not loss metrics)
IGNORED = {"entropy", "num_tokens", "mean_token_accuracy", "aux_loss", "runtime", "samples_per_second",
           "steps_per_second", "epoch"}


def _pick_example(seqs: list[dict], i: int, n: int, weighted: bool) -> list[dict]:
    """WPO-weight trick to read TRL's per-example loss from a full batch: pair i gets weight n (times its own
    WPO weight when the case uses WPO), every other pair weight exp(-300) = 0, so mean(loss * w) = loss_i."""
    out = []
    for j, s in enumerate(seqs):
        s = dict(s)
        if j == i:
            s["sq"] = (s["sq"] if weighted else s["tok"]) - torch.log(torch.tensor(float(n))) / 2
        else:
            s["sq"] = s["sq"] + 300.0
        out.append(s)
    return out


def sdiff(a, b) -> float:
    """max |a - b| / max(1, |a|): absolute below 1, relative above (fp32 cannot resolve 1e-5 past ~100)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / a.abs().clamp(min=1)).max()) if a.numel() else 0.0


def _metric_diffs(trl: dict, mine: dict, name: str) -> tuple[float, str, list[str], list[str]]:
    worst, worst_key, by_design = 0.0, "", []
    for k in sorted(set(trl) & set(mine) - IGNORED):
        d = sdiff(trl[k], mine[k])
        if (name, k) in BY_DESIGN:
            by_design.append(f"{k}:{d:.1e}")
            continue
        if d > worst:
            worst, worst_key = d, k
    missing = sorted(set(trl) - set(mine) - IGNORED)
    return worst, worst_key, by_design, missing


def trl_per_example(cfg: dict, chosen: list[dict], rejected: list[dict]) -> torch.Tensor:
    """TRL's per-example losses from full-batch runs (``_pick_example``). TRL's ``sft`` term is one batch
    value expanded per pair and cannot be WPO-weighted in TRL 1.16 (in-place multiply on an expanded
    tensor raises), so it is read from a separate sft-only full-batch run and added with its weight."""
    n = len(chosen)
    types, weights = cfg["loss_types"], cfg["loss_weights"]
    sft = sum(w for t, w in zip(types, weights) if t == "sft")
    rest = [(t, w) for t, w in zip(types, weights) if t != "sft"]
    total = torch.zeros(n)
    if sft:
        total += sft * trl_paired({**cfg, "loss_types": ["sft"], "loss_weights": [1.0]}, chosen, rejected)[0]
    if rest:
        sub = {**cfg, "loss_types": [t for t, _ in rest], "loss_weights": [w for _, w in rest], "use_weighting": True}
        weighted = bool(cfg.get("use_weighting"))
        total += torch.tensor([trl_paired(sub, _pick_example(chosen, i, n, weighted),
                                          _pick_example(rejected, i, n, weighted))[0] for i in range(n)])
    return total


def compare_logps(c, n: int = 8, seed: int = 0) -> dict:
    """Per-example losses / rewards and batch loss / metrics of case ``c``: ours vs TRL on random log-probs."""
    gen = torch.Generator().manual_seed(seed)
    loss = get_loss(c.name, **c.ours)
    res = {"case": c.label}
    if c.trl["kind"] == "kto":
        rows, kl_rows = synth(n, gen), synth(n, gen)
        for s in kl_rows:  # a positive KL estimate on average, so the clamp at 0 does not hide the term
            s["ref"] -= 1.5
        labels = [bool(v) for v in (torch.rand(n, generator=gen) < 0.5).tolist()]
        labels[0], labels[1] = True, False
        batch = {"index": torch.arange(n), "label": torch.tensor(labels),
                 "ref_logps": torch.tensor([s["ref"] for s in rows]),
                 "ref_kl_logps": torch.tensor([s["ref"] for s in kl_rows])}
        out, mine = ours(loss, rows + kl_rows, batch)
        tl, trl = trl_unpaired(c.trl, rows, labels, kl_rows)
        per = [trl_unpaired(c.trl, [rows[i]], [labels[i]], kl_rows) for i in range(n)]
        trl_losses = torch.tensor([p[0] for p in per])
        trl_rewards = torch.tensor([p[1]["rewards/chosen" if labels[i] else "rewards/rejected"] for i, p in enumerate(per)])
        lab = torch.tensor(labels)
        our_rewards = torch.empty(n)
        our_rewards[lab], our_rewards[~lab] = out.chosen_rewards, out.rejected_rewards
        res["reward"] = sdiff(trl_rewards, our_rewards)
    else:
        chosen, rejected = synth(n, gen), synth(n, gen)
        batch = {"index": torch.arange(n)}
        if loss.requires_reference:  # cached-reference layout; "shared" = LD-DPO's shared-length part (0.6 x)
            for side, seqs in (("chosen", chosen), ("rejected", rejected)):
                batch[f"ref_{side}_logps"] = torch.tensor([s["ref"] for s in seqs])
                batch[f"ref_{side}_shared_logps"] = 0.6 * batch[f"ref_{side}_logps"]
        out, mine = ours(loss, chosen + rejected, batch)
        if c.trl["kind"] == "dpo":
            tl, trl = trl_paired(c.trl, chosen, rejected)
            if {"aot", "aot_unpaired"} & set(c.trl["loss_types"]):
                trl_losses = None  # sorted ranks: TRL exposes only the batch mean (it refuses WPO weights here)
            else:
                trl_losses = trl_per_example(c.trl, chosen, rejected)
            singles = [trl_paired(c.trl, [chosen[i]], [rejected[i]])[1] for i in range(n)]
            trl_cr = torch.tensor([s["rewards/chosen"] for s in singles])
            trl_rr = torch.tensor([s["rewards/rejected"] for s in singles])
        else:
            trl_losses, trl_cr, trl_rr, trl = trl_reference_free(c.trl, chosen, rejected)
            tl = trl["loss"]
        res["reward"] = max(sdiff(trl_cr, out.chosen_rewards), sdiff(trl_rr, out.rejected_rewards))
    res["per_example"] = None if trl_losses is None else sdiff(trl_losses, out.losses.detach())
    res["batch_loss"] = sdiff(tl, mine["loss"])
    res["metric"], res["metric_key"], res["by_design"], res["missing"] = _metric_diffs(trl, mine, c.name)
    res["metric"] = max(res["metric"], res["batch_loss"])
    return res


def part1(seeds=(0, 1, 2)) -> list[dict]:
    rows = []
    for c in CASES:
        if c.trl is None:
            rows.append({"case": c.label, "na": NOT_IN_TRL.get(c.name, "not in TRL")})
            continue
        results = [compare_logps(c, seed=s) for s in seeds]
        worst = {"case": c.label, "by_design": results[0]["by_design"], "missing": results[0]["missing"]}
        for k in ("per_example", "reward", "batch_loss", "metric"):
            vals = [r[k] for r in results if r[k] is not None]
            worst[k] = max(vals) if vals else None
        worst["metric_key"] = max(results, key=lambda r: r["metric"])["metric_key"]
        rows.append(worst)
    return rows


# ---------------------------------------------------------------------------- part 2: tiny policy vs reference
def part2() -> list[dict]:
    """One tiny policy vs. one reference through TRL's trainers and ours (``trl_parity_models.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trl_parity_models import part2 as run

    return run()


# ---------------------------------------------------------------------------- report
def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-model", action="store_true", help="skip part 2 (tiny policy vs. reference)")
    ap.add_argument("--seeds", type=int, default=3, help="random batches per case in part 1")
    args = ap.parse_args(argv)
    ok = True
    print(f"Part 1: same per-token log-probs through TRL 1.16 and dpo_lightning ({args.seeds} batches of 8; "
          f"diff = |a-b|/max(1,|a|), tolerance {TOL_LOGPS:g})")
    print(f"{'case':40s} {'per-ex loss':>11s} {'reward':>9s} {'metrics':>9s}  worst metric / notes")
    for r in part1(tuple(range(args.seeds))):
        if "na" in r:
            print(f"{r['case']:40s} {'n/a':>11s} {'n/a':>9s} {'n/a':>9s}  {r['na']}")
            continue
        worst = max(v for v in (r["per_example"], r["reward"], r["metric"]) if v is not None)
        ok &= worst <= TOL_LOGPS and not r["missing"]
        notes = [r["metric_key"]] + ([f"by design: {', '.join(r['by_design'])}"] if r["by_design"] else [])
        notes += [f"MISSING {r['missing']}"] if r["missing"] else []
        notes += ["per-example n/a (sorted ranks)"] if r["per_example"] is None else []
        print(f"{r['case']:40s} {_fmt(r['per_example']):>11s} {_fmt(r['reward']):>9s} {_fmt(r['metric']):>9s}  "
              + "; ".join(n for n in notes if n))
    if not args.no_model:
        print(f"\nPart 2: tiny policy (seed 0) vs. reference (seed 1), 8 rows, TRL trainer vs. PreferenceLitModule "
              f"(tolerance {TOL_MODEL:g})")
        print(f"{'case':40s} {'TRL loss':>10s} {'our loss':>10s} {'metrics':>9s} tokens  worst metric / notes")
        for r in part2():
            ok &= r["metric"] <= TOL_MODEL and r["tokens_equal"] and not r["missing"]
            notes = [r["metric_key"]] + ([f"by design: {', '.join(r['by_design'])}"] if r["by_design"] else [])
            notes += [f"MISSING {r['missing']}"] if r["missing"] else []
            notes += r["info"]
            tl, ml = r["loss"]
            print(f"{r['case']:40s} {tl:10.6f} {ml:10.6f} {_fmt(r['metric']):>9s} {'same' if r['tokens_equal'] else 'DIFF':>6s}  "
                  + "; ".join(n for n in notes if n))
    print("\nall within tolerance" if ok else "\nSOME DIFFERENCES EXCEED THE TOLERANCE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
