"""Weighted sums of registry losses (TRL 1.16 ``loss_type=[...]`` + ``loss_weights``) and two presets.

    get_loss("combination", losses=[{"name": "sigmoid", "weight": 0.8}, {"name": "bco_pair", "weight": 0.2},
                                     "sft"], beta=0.1)
    get_loss("mpo")                       # 0.8 sigmoid + 0.2 bco_pair + 1.0 sft
    get_loss("rpo", rpo_alpha=1.0)        # sigmoid + rpo_alpha * sft

loss = sum_i w_i * mean(losses_i), per-example losses sum_i w_i * losses_i. ``beta`` and the f-divergence
are shared by every member that takes them (TRL has one of each); members may override other
hyperparameters. Rewards and unlisted metrics come from the first member (TRL: beta * log-ratio).
Modifiers (``ld_alpha``, ``use_weighting``) belong to the combination and apply to every member, as in TRL.
The ``Loss`` stores member names and hyperparameters only, so it stays picklable.
"""

from __future__ import annotations

import math
from typing import Any

from dpo_lightning.losses.fdivergence import F_DIVERGENCES
from dpo_lightning.losses.registry import LOSSES, MODIFIERS, LossInputs, LossOutput, get_loss, register

SHARED = ("beta", "f_divergence_type", "f_alpha_divergence_coef")
F_NEUTRAL = {"sft"}  # does not use the log-ratios, so any f-divergence is fine (as TRL)


def normalize(hp: dict[str, Any]) -> dict[str, Any]:
    """``bind`` hook: members -> [{"name", "weight", **full hyperparameters}], validated; metadata checked."""
    members = hp.get("losses")
    if not members:
        raise TypeError("loss 'combination' needs losses=[...] (names or {name, weight, ...hparams} dicts)")
    weights = hp.get("weights")
    if weights is not None and len(weights) != len(members):
        raise ValueError(f"combination: {len(weights)} weights for {len(members)} losses")
    fdiv = hp.get("f_divergence_type", "reverse_kl")
    if fdiv not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type={fdiv!r}; use one of {', '.join(F_DIVERGENCES)}")
    out = []
    for i, m in enumerate(members):
        m = {"name": m} if isinstance(m, str) else dict(m)
        name = m.pop("name", None)
        if name not in LOSSES or LOSSES[name].bind is normalize:
            raise ValueError(f"combination member {i}: {name!r} is not a registered (non-combination) loss")
        weight = float(m.pop("weight", 1.0 if weights is None else weights[i]))
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"loss.weights: member {i} ({name!r}) has weight {weight}; weights must lie in [0, inf)")
        if set(m) & set(MODIFIERS):
            raise ValueError(f"combination member {name!r}: set {sorted(set(m) & set(MODIFIERS))} on the "
                             "combination itself; modifiers apply to every member")
        keywords = LOSSES[name].keywords
        for key in SHARED:
            if key in keywords and key in hp:
                m.setdefault(key, hp[key])
        if fdiv != "reverse_kl" and "f_divergence_type" not in keywords and name not in F_NEUTRAL:
            raise ValueError(f"f_divergence_type={fdiv!r} is not defined for {name!r} (only for losses built on "
                             "the chosen-minus-rejected score difference)")
        out.append({"name": name, "weight": weight, **get_loss(name, **m).hparams})
    specs = [LOSSES[m["name"]] for m in out]
    for key in ("paired", "length_normalized"):
        if len({getattr(s, key) for s in specs}) > 1:
            raise ValueError(f"combination members disagree on {key}: "
                             + ", ".join(f"{s.name}={getattr(s, key)}" for s in specs))
    for mod in MODIFIERS:
        if hp.get(mod) and any(mod not in s.modifiers for s in specs):
            bad = [s.name for s in specs if mod not in s.modifiers]
            raise ValueError(f"{mod} is not supported by combination member(s) {bad}")
    return {**hp, "losses": out, "weights": None}


def resolve(hp: dict[str, Any]) -> dict[str, Any]:
    """Metadata of a combination from its members."""
    specs = [LOSSES[m["name"]] for m in hp["losses"]]
    return {"requires_reference": any(s.requires_reference for s in specs), "paired": specs[0].paired,
            "length_normalized": specs[0].length_normalized,
            "needs_kl_pairs": any(s.needs_kl_pairs for s in specs)}


def combine(x: LossInputs, members: list[tuple[str, float, dict[str, Any]]]) -> LossOutput:
    """sum_i w_i * member_i(x); rewards and first-seen metrics from the members in order."""
    loss = losses = first = None
    metrics: dict = {}
    for name, weight, hparams in members:
        out = LOSSES[name].fn(x, **hparams)
        loss = weight * out.loss if loss is None else loss + weight * out.loss
        losses = weight * out.losses if losses is None else losses + weight * out.losses
        first = first or out
        for k, v in out.metrics.items():
            metrics.setdefault(k, v)
    assert loss is not None and losses is not None and first is not None  # normalize() refuses no members
    return LossOutput(loss, losses, first.chosen_rewards, first.rejected_rewards, metrics)


@register("combination", paper="Weighted sum of registry losses (TRL loss_type list + loss_weights)",
          modifiers=MODIFIERS, bind=normalize, resolve=resolve)
def combination(x: LossInputs, *, losses: list, weights: list | None = None, beta: float = 0.1,
                f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """sum_i w_i * losses[i](x). Members are normalized by ``get_loss`` (call through it, or pass them so)."""
    if any(isinstance(m, str) or "weight" not in m for m in losses) or weights is not None:
        losses = normalize({"losses": losses, "weights": weights, "beta": beta, "f_divergence_type": f_divergence_type,
                            "f_alpha_divergence_coef": f_alpha_divergence_coef})["losses"]
    return combine(x, [(m["name"], m["weight"], {k: v for k, v in m.items() if k not in ("name", "weight")})
                       for m in losses])


@register("mpo", paper="Wang et al. 2024 (MPO), arXiv:2411.10442, Sec. 3: w_p DPO + w_q BCO + w_g SFT "
          "(TRL's example weights 0.8 / 0.2 / 1.0)")
def mpo(x: LossInputs, *, beta: float = 0.1, sigmoid_weight: float = 0.8, bco_pair_weight: float = 0.2,
        sft_weight: float = 1.0) -> LossOutput:
    """Mixed preference optimization: preference (sigmoid) + quality (bco_pair) + generation (sft) losses."""
    return combine(x, [("sigmoid", sigmoid_weight, {"beta": beta}), ("bco_pair", bco_pair_weight, {"beta": beta}),
                       ("sft", sft_weight, {"beta": beta})])


@register("rpo", paper="Pang et al. 2024 (Iterative RPO), arXiv:2404.19733, Sec. 2: L_DPO + alpha L_NLL")
def rpo(x: LossInputs, *, beta: float = 0.1, rpo_alpha: float = 1.0) -> LossOutput:
    """DPO (sigmoid) + rpo_alpha * token-mean NLL of the chosen completions (TRL: loss_type=[sigmoid, sft]).

    Departure from the paper: its NLL is normalized per sequence; TRL's (and ours) is the batch token-mean.
    """
    return combine(x, [("sigmoid", 1.0, {"beta": beta}), ("sft", rpo_alpha, {"beta": beta})])
