"""Generation evaluation: sample completions from the policy and the reference, score them, summarize.

    settings = GenerationSettings(num_prompts=8, num_samples=2, max_new_tokens=64)
    records, ref_cache = generate_and_score(module, tokenizer, prompts, settings, judge=None, seed=0)
    metrics = summarize(records)       # {"gen/kl": ..., "gen/kl_stderr": ..., "gen/length": ..., ...}

Metrics, over the policy's samples y ~ pi(.|x) (one value per sample, then mean and standard error):

    gen/kl        log pi(y|x) - log pi_ref(y|x), summed over the completion's tokens: the Monte-Carlo estimate of
                  KL(pi || pi_ref) per sequence. Both log-probs come from the training engine (``engine/logprobs.py``).
                  Unbiased when the samples come from pi itself: temperature 1, top_p 1 (the defaults).
    gen/entropy   -log pi(y|x): the sequence-entropy estimate TRL's online trainers log (nats per sequence)
    gen/length    completion tokens (EOS included)
    gen/eos_rate  share of samples that end with EOS (the rest hit max_new_tokens)
    gen/win_rate  with a judge: mean P(policy sample beats the reference's sample for the same prompt)
    gen/reward    with a reward-model judge: its mean score of the policy's samples

Prompts are left-padded; the sampling RNG is forked from a fixed seed, so the training RNG stream (and so the
training itself) is the same with or without generation evaluation.

Prompts with images (a vision model's held-out rows: ``(index, prompt ids, [image bytes])``, and its processor in
place of the tokenizer) are sampled with the images' pixel inputs, made by the collator's own function
(``data/vision_collate.pixel_inputs``), and scored by the engine with the batch carrying ``vision`` (plain layout:
each row's images in row order); their records gain ``images``: ``[{"sha256": ...}]`` (never the bytes).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from dpo_lightning.data.images import image_token_ids
from dpo_lightning.data.layouts import plain_layout
from dpo_lightning.data.vision_collate import pixel_inputs
from dpo_lightning.engine.logprobs import sequence_logps
from dpo_lightning.models.quirks import engine_plan
from dpo_lightning.models.vision import is_processor, text_tokenizer

Images = list[bytes]  # one prompt's images, encoded (PNG, JPEG, ...), in the order of its image tokens


@dataclass
class GenerationSettings:
    """The ``generation`` config group binds to this.

    Attributes:
        num_prompts: held-out prompts sampled at each validation (the first ones, in data order); 0 = off.
        num_samples: completions per prompt from each model.
        max_new_tokens: longest completion.
        temperature: sampling temperature; 0 = greedy.
        top_p: nucleus sampling mass (1.0 = off).
        batch_size: sequences generated (and scored) at once.
        seed: sampling seed.
        judge: None, a reward model (local folder or hub id) or a callable ``"my_pkg.judges:prefer_shorter"``.
        judge_batch_size: completions a reward-model judge scores at once.
    """

    num_prompts: int = 8
    num_samples: int = 2
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0
    judge: str | None = None
    judge_batch_size: int = 16

    def __post_init__(self):
        checks = [("num_prompts", self.num_prompts >= 0, ">= 0"), ("num_samples", self.num_samples >= 1, ">= 1"),
                  ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"), ("temperature", self.temperature >= 0, ">= 0"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("batch_size", self.batch_size >= 1, ">= 1"),
                  ("judge_batch_size", self.judge_batch_size >= 1, ">= 1")]
        for key, ok, valid in checks:
            if not ok:
                raise ValueError(f"generation.{key}={getattr(self, key)}: must be {valid}")


def _as_settings(settings: GenerationSettings | dict | None) -> GenerationSettings:
    if isinstance(settings, GenerationSettings):
        return settings
    return GenerationSettings(**{k: v for k, v in dict(settings or {}).items() if k != "_target_"})


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.as_tensor(r, dtype=torch.long)
        mask[i, L - len(r):] = 1
    return ids, mask


def _generation_config(settings: GenerationSettings, pad_id: int, eos_id: int):
    """Explicit settings: nothing is inherited from the model's own generation_config (top_k, repetition
    penalty, ...), so sampling is from pi (tempered / nucleus-truncated only as configured)."""
    from transformers import GenerationConfig

    sample = settings.temperature > 0
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=sample, num_beams=1,
        temperature=settings.temperature if sample else 1.0, top_p=settings.top_p if sample else 1.0, top_k=0,
        min_p=0.0, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
        pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True)


def _vision(model: torch.nn.Module, processor: Any, ids: torch.Tensor, images: list[Images] | None,
            ) -> dict[str, torch.Tensor]:
    """The image inputs of a generation batch (rows ``ids``, row i's images ``images[i]``): the processor's pixel
    tensors of every image in row order, and the per-token types the model's forward takes (1 on image tokens, or
    0 on a prompt for a ``suffix`` rule: all of it is prefix). {} when no row has an image."""
    flat = [b for row in images or [] for b in row]
    if not flat:
        return {}
    if processor is None:
        raise ValueError("generation: prompts with images need the model's processor (not only its tokenizer)")
    out = pixel_inputs(processor, [list(row) for row in images or []])  # per prompt: a family may tell 1 image from 2
    plan = engine_plan(model).vision
    if plan is not None:
        for name, rule in plan.token_types.items():
            out[name] = (ids.eq(plan.image_token_id).long() if rule == "image" and plan.image_token_id is not None
                         else torch.zeros_like(ids))
    return out


@torch.no_grad()
def sample_completions(model: torch.nn.Module, prompts: list[list[int]], settings: GenerationSettings, *,
                       pad_token_id: int, eos_token_id: int, seed: int, synced_gpus: bool = False,
                       images: list[Images] | None = None, processor: Any = None) -> list[list[int]]:
    """``settings.num_samples`` completions per prompt (prompt-major order), each cut after its first EOS.
    ``images[i]``: prompt i's images (``processor`` makes their pixel inputs). With a processor, the tokens an
    image expands to are never sampled: a completion is text (an image token in it would ask the model's forward
    for an image feature that is not there)."""
    rows = [p for p in prompts for _ in range(settings.num_samples)]
    row_images = [im for im in (images or [[]] * len(prompts)) for _ in range(settings.num_samples)]
    device = next(model.parameters()).device
    config = _generation_config(settings, pad_token_id, eos_token_id)
    if processor is not None:
        config.suppress_tokens = sorted(image_token_ids(processor))
    out: list[list[int]] = []
    was_training = model.training
    model.eval()
    fork = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(seed)
            for start in range(0, len(rows), settings.batch_size):
                ids, mask = _left_pad(rows[start:start + settings.batch_size], pad_token_id)
                vision = _vision(model, processor, ids, row_images[start:start + settings.batch_size])
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),  # type: ignore[operator]  # HF
                                     generation_config=config, synced_gpus=synced_gpus,
                                     **{k: v.to(device) for k, v in vision.items()})
                for seq in gen[:, ids.size(1):].tolist():
                    cut = seq.index(eos_token_id) + 1 if eos_token_id in seq else len(seq)
                    out.append(seq[:cut])
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def score_completions(model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]], *,
                      pad_token_id: int, batch_size: int = 16, chunk_size: int = 1024,
                      full_logits: bool = False, images: list[Images] | None = None,
                      processor: Any = None) -> torch.Tensor:
    """[n] sum of completion-token log-probs under ``model`` (fp32, CPU), by the training engine;
    ``images[i]``: sequence i's prompt images (the batch carries their pixel inputs as ``vision``)."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = plain_layout(prompts[s:s + batch_size], completions[s:s + batch_size], pad_token_id)
        flat = [b for row in (images or [])[s:s + batch_size] for b in row]
        if flat:  # the plain layout: each row's images, row after row (the order of the image tokens)
            if processor is None:
                raise ValueError("scoring prompts with images needs the model's processor")
            batch["vision"] = pixel_inputs(processor, [list(row) for row in (images or [])[s:s + batch_size]])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if batch.get("vision"):
            batch["vision"] = {k: v.to(device) for k, v in batch["vision"].items()}
        out.append(sequence_logps(model, batch, batch["num_sequences"], chunk_size=chunk_size,
                                  full_logits=full_logits).logps.float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def generate_and_score(module, tokenizer, prompts: list[tuple], settings: GenerationSettings, *,
                       judge=None, seed: int = 0, reference_samples: dict[int, list[list[int]]] | None = None,
                       synced_gpus: bool = False, open_reference: bool = True,
                       ) -> tuple[list[dict[str, Any]], dict[int, list[list[int]]]]:
    """Sample from the policy (and, unless given, the reference) for ``prompts`` [(index, prompt ids)] or, with
    images, [(index, prompt ids, [image bytes])] (``tokenizer``: then the processor), score the policy's samples
    under both models and judge them against the reference's; one record per sample.

    With precomputed reference log-probs the reference weights are opened for this call (``open_reference``;
    ``Reference.scoring_model(open_cached=True)``) and released after it, so ``gen/kl`` and the judge work
    whether or not training runs a live reference. Returns (records, reference samples by prompt index) so a
    caller can reuse the reference's samples.
    """
    settings = _as_settings(settings)
    processor = tokenizer if is_processor(tokenizer) else None
    tokenizer = text_tokenizer(tokenizer)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    k = settings.num_samples
    pics = {p[0]: list(p[2]) for p in prompts if len(p) > 2 and p[2]}  # prompt index -> its images
    prompts = [(p[0], p[1]) for p in prompts]
    ids = [p for _, p in prompts]
    rep = [p for p in ids for _ in range(k)]
    vis: dict[str, Any] = dict(processor=processor) if pics else {}  # text prompts: the calls as they were
    if pics:
        vis["images"] = [pics.get(i, []) for i, _ in prompts]
    policy = sample_completions(module.policy, ids, settings, pad_token_id=pad, eos_token_id=eos, seed=seed,
                                synced_gpus=synced_gpus, **vis)
    opts = dict(pad_token_id=pad, batch_size=settings.batch_size, chunk_size=module.chunk_size,
                full_logits=module.full_logits)
    if pics:
        opts.update(processor=processor, images=[pics.get(i, []) for i, _ in prompts for _ in range(k)])
    logp = score_completions(module.policy, rep, policy, **opts)
    reference_samples = dict(reference_samples or {})
    ref_logp = None
    with module.reference.scoring_model(open_cached=open_reference) as ref:  # None: reference-free
        if ref is not None:
            missing = [(i, p) for i, p in prompts if i not in reference_samples]
            if missing:
                extra = dict(processor=processor, images=[pics.get(i, []) for i, _ in missing]) if pics else {}
                new = sample_completions(ref, [p for _, p in missing], settings, pad_token_id=pad,
                                         eos_token_id=eos, seed=seed + 1, synced_gpus=synced_gpus, **extra)
                for j, (i, _) in enumerate(missing):
                    reference_samples[i] = new[j * k:(j + 1) * k]
            ref_logp = score_completions(ref, rep, policy, **opts)
    text = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    prompt_text = [text(p) for _, p in prompts for _ in range(k)]
    policy_text = [text(c) for c in policy]
    ref_text = [text(c) for i, _ in prompts for c in reference_samples.get(i, [[]] * k)]
    judged = scores = None
    if judge is not None and ref_logp is not None:
        if hasattr(judge, "load"):
            judge.load(module.device)
        if hasattr(judge, "score"):  # a reward model: its scores are logged too (gen/reward)
            scores = judge.score(prompt_text, policy_text)
            judged = judge.preference(scores, judge.score(prompt_text, ref_text))
        else:
            judged = judge.compare(prompt_text, policy_text, ref_text)
    records = []
    for n in range(len(policy)):
        rec = {"prompt_index": prompts[n // k][0], "sample": n % k, "prompt": prompt_text[n],
               "policy": policy_text[n], "reference": ref_text[n] if ref_logp is not None else None,
               "length": len(policy[n]), "eos": bool(policy[n]) and policy[n][-1] == eos,
               "policy_logp": float(logp[n]),
               "reference_logp": float(ref_logp[n]) if ref_logp is not None else None,
               "kl": float(logp[n] - ref_logp[n]) if ref_logp is not None else None,
               "judge": float(judged[n]) if judged is not None else None,
               "reward": float(scores[n]) if scores is not None else None}
        if pics.get(rec["prompt_index"]):  # which image(s) the prompt showed: their sha256, never the bytes
            rec["images"] = [{"sha256": hashlib.sha256(b).hexdigest()} for b in pics[rec["prompt_index"]]]
        records.append(rec)
    return records, reference_samples


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def summarize(records: list[dict[str, Any]]) -> dict[str, float]:
    """The ``gen/*`` metrics of a list of sample records (see the module docstring)."""
    if not records:
        return {}
    out: dict[str, float] = {}
    out["gen/length"] = _mean_stderr([r["length"] for r in records])[0]
    out["gen/eos_rate"] = _mean_stderr([float(r["eos"]) for r in records])[0]
    out["gen/entropy"] = _mean_stderr([-r["policy_logp"] for r in records])[0]
    for key, name in (("kl", "gen/kl"), ("judge", "gen/win_rate")):
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            out[name], out[f"{name}_stderr"] = _mean_stderr(values)
    rewards = [r["reward"] for r in records if r.get("reward") is not None]
    if rewards:
        out["gen/reward"] = _mean_stderr(rewards)[0]
    return out


def gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's records on every rank, sorted by (prompt, sample); a no-op without torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: (r["prompt_index"], r["sample"]))


def held_out_prompts(rows: list[dict[str, Any]], n: int) -> list[tuple]:
    """The first ``n`` distinct prompts of tokenized rows, in data order: [(prompt number, prompt ids)], or
    (prompt number, prompt ids, [image bytes]) for a row with images (the same text with another image is
    another prompt)."""
    seen: dict[tuple, list[bytes]] = {}
    for row in sorted(rows, key=lambda r: r.get("index", 0)):
        pics = [bytes(b) for b in row.get("images") or []]
        key = (tuple(row["prompt_ids"]), *(hashlib.sha256(b).hexdigest() for b in pics))
        seen.setdefault(key, pics)
        if len(seen) >= n:
            break
    return [(i, list(key[0]), pics) if pics else (i, list(key[0])) for i, (key, pics) in enumerate(seen.items())]
