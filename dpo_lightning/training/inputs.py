"""From per-token log-probs to a loss's inputs: LD-DPO split, length normalization, WPO weights, metrics.

Everything here depends on loss *metadata* and hyperparameters (``length_normalized``, ``ld_alpha``,
``use_weighting``), never on a loss name.
"""

from __future__ import annotations

from typing import Any

import torch

from dpo_lightning.engine.logprobs import SeqLogps
from dpo_lightning.losses.registry import Loss, LossInputs


def reduce_logps(out: SeqLogps, num_pairs: int | None, ld_alpha: float | None) -> torch.Tensor:
    """Sequence log-probs [S]: plain sums, or LD-DPO's shared + alpha * tail when ``ld_alpha`` is set.

    LD-DPO (Liu et al. 2024, arXiv:2409.06411, Eq. 9): tokens past the shorter completion of the pair
    count with weight alpha. Needs paired rows (chosen i -> i, rejected i -> B + i).
    """
    if ld_alpha is None or num_pairs is None:
        return out.logps
    lengths = out.lengths
    shared = torch.minimum(lengths[:num_pairs], lengths[num_pairs: 2 * num_pairs])  # [B]
    shared = torch.cat([shared, shared, lengths[2 * num_pairs:]])  # [S]
    weight = torch.where(out.pos <= shared[out.seq], 1.0, float(ld_alpha)).to(out.token_logps.dtype)
    return out.token_logps.new_zeros(lengths.numel()).index_add(0, out.seq, out.token_logps * weight)


def batch_reference(batch: dict[str, Any], key: str, lengths: torch.Tensor, ld_alpha: float | None,
                    length_normalized: bool) -> torch.Tensor:
    """Precomputed reference values of ``batch[key]`` (sums over completion tokens), finished the way
    ``build_inputs`` finishes a live reference: LD-DPO's shared + alpha * tail from ``<key>_shared`` sums,
    then the length normalization the loss asks for."""
    ref = batch[key].float()
    if ld_alpha is not None:
        shared_key = key.replace("_logps", "_shared_logps")
        if shared_key not in batch:
            raise KeyError(f"ld_alpha needs {shared_key!r} next to {key!r} in the batch (reference/cache.py "
                           "stores both)")
        shared = batch[shared_key].float()
        ref = shared + float(ld_alpha) * (ref - shared)
    return ref / lengths.clamp(min=1) if length_normalized else ref


def wpo_weights(out: SeqLogps) -> torch.Tensor:
    """WPO (Zhou et al. 2024, arXiv:2406.11827, Eq. 2) per-sequence weights [S], no grad:
    exp(mean over tokens of log p - log sum_v p_v^2), as TRL 1.16 computes them."""
    aligned = (out.token_logps.detach() - out.log_sum_sq)
    sums = aligned.new_zeros(out.lengths.numel()).index_add(0, out.seq, aligned)
    return torch.exp(sums / out.lengths.clamp(min=1))


def build_inputs(loss: Loss, policy: SeqLogps, reference: SeqLogps | None,
                 batch: dict[str, Any]) -> tuple[LossInputs, dict[str, torch.Tensor]]:
    """``LossInputs`` for ``loss`` plus the log-prob / logit metrics TRL logs."""
    ld_alpha = loss.hparams.get("ld_alpha")
    paired = loss.paired
    B = int(batch["index"].numel())
    lengths = policy.lengths

    def finish(out: SeqLogps | None) -> torch.Tensor | None:
        if out is None:
            return None
        logps = reduce_logps(out, B if paired else None, ld_alpha)
        return logps / out.lengths.clamp(min=1) if loss.length_normalized else logps

    logps, ref = finish(policy), finish(reference)
    metrics: dict[str, torch.Tensor] = {}
    if paired:
        x = LossInputs(chosen_logps=logps[:B], rejected_logps=logps[B:2 * B],
                       chosen_lengths=lengths[:B], rejected_lengths=lengths[B:2 * B])
        if ref is not None:
            x.ref_chosen_logps, x.ref_rejected_logps = ref[:B], ref[B:2 * B]
        elif "ref_chosen_logps" in batch:
            x.ref_chosen_logps, x.ref_rejected_logps = (
                batch_reference(batch, f"ref_{k}_logps", lens, ld_alpha, loss.length_normalized)
                for k, lens in (("chosen", lengths[:B]), ("rejected", lengths[B:2 * B])))
        chosen_tokens = policy.seq < B
        if "step_chosen_tokens" in batch:  # this micro-batch's share of the step's token mean (accumulation.py)
            x.chosen_nll = -policy.token_logps[chosen_tokens].sum() * batch["accumulate"] / batch["step_chosen_tokens"]
        else:
            x.chosen_nll = -policy.token_logps[chosen_tokens].mean()
        if loss.hparams.get("use_weighting"):
            w = wpo_weights(policy)
            x.chosen_weights, x.rejected_weights = w[:B], w[B:2 * B]
        metrics["logps/chosen"] = x.chosen_logps.detach().mean()
        metrics["logps/rejected"] = x.rejected_logps.detach().mean()
        metrics["logits/chosen"] = policy.logits_sum[:B].sum() / lengths[:B].sum().clamp(min=1)
        metrics["logits/rejected"] = policy.logits_sum[B:2 * B].sum() / lengths[B:2 * B].sum().clamp(min=1)
    else:
        labels = batch["label"].bool()
        x = LossInputs(logps=logps[:B], labels=labels, chosen_lengths=lengths[:B])
        if logps.numel() >= 2 * B:
            x.kl_logps = logps[B:2 * B]
        if ref is not None:
            x.ref_logps = ref[:B]
            if ref.numel() >= 2 * B:
                x.ref_kl_logps = ref[B:2 * B]
        elif "ref_logps" in batch:
            x.ref_logps = batch_reference(batch, "ref_logps", lengths[:B], None, loss.length_normalized)
            x.ref_kl_logps = batch.get("ref_kl_logps")
        for name, sel in (("chosen", labels), ("rejected", ~labels)):
            rows = sel.nonzero(as_tuple=True)[0]
            if rows.numel():
                metrics[f"logps/{name}"] = x.logps.detach()[rows].mean()
                metrics[f"logits/{name}"] = policy.logits_sum[rows].sum() / lengths[rows].sum().clamp(min=1)
    return x, metrics
