"""f-DPO: replace the reverse-KL log-ratio by the derivative f'(pi/pi_ref) of another f-divergence.

Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
Constraints", arXiv:2309.16240, Theorem 1 / Table 1 (f'(u) for each divergence). As in TRL 1.16, the
"scores" replace the log-ratios only in the losses built on the chosen-minus-rejected difference
(sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop); elsewhere the log Z(x) term would not
cancel, so those losses do not accept ``f_divergence_type``. Rewards stay beta * log-ratio.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpo_lightning.losses.common import logratios
from dpo_lightning.losses.registry import LossInputs

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_prime(logratio: torch.Tensor, f_divergence_type: str = "reverse_kl",
            f_alpha_divergence_coef: float = 0.5) -> torch.Tensor:
    """f'(t) at t = pi/pi_ref, given log t. [B] -> [B]."""
    if f_divergence_type == "reverse_kl":  # f'(t) = log t (+1, which cancels)
        return logratio
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratio)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (t + 1)) = log 2 + log sigmoid(log t)
        return math.log(2) + F.logsigmoid(logratio)
    if f_divergence_type == "alpha_divergence":  # f'(t) = (t^(a-1) - 1) / (a - 1)
        a = float(f_alpha_divergence_coef)
        if abs(a - 1.0) < 1e-6:  # limit a -> 1 is log t
            return logratio
        cap = 11.0 if logratio.dtype == torch.float16 else 80.0  # TRL's clamp: exp stays finite in the dtype
        t = torch.clamp(((a - 1.0) * logratio).float(), max=cap)
        return ((torch.exp(t) - 1.0) / (a - 1.0)).to(logratio.dtype)
    raise ValueError(f"f_divergence_type={f_divergence_type!r}; use one of {', '.join(F_DIVERGENCES)}")


def scores(x: LossInputs, f_divergence_type: str = "reverse_kl",
           f_alpha_divergence_coef: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) f-DPO scores, each [B]; reverse_kl gives the plain log-ratios."""
    c, r = logratios(x)
    return (f_prime(c, f_divergence_type, f_alpha_divergence_coef),
            f_prime(r, f_divergence_type, f_alpha_divergence_coef))


def check(hparams: dict) -> dict:
    """``bind`` hook: reject an unknown ``f_divergence_type`` when the loss is built, not mid-training."""
    kind = hparams.get("f_divergence_type", "reverse_kl")
    if kind not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type={kind!r}; use one of {', '.join(F_DIVERGENCES)}")
    return hparams
