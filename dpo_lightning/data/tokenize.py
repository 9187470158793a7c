"""Tokenize normalized records the way TRL 1.16 does, then truncate.

Text: EOS is appended to each completion; the prompt, prompt+chosen and prompt+rejected are tokenized and the
completions start where the tokenized prompt and prompt+completion diverge (normally right after the prompt;
TRL's ``common_prefix_length`` rule, which also handles tokens merging across the boundary).
Conversational: the same with the tokenizer's chat template (prompt rendered with the generation prompt).

Truncation (all lengths in tokens, applied per row so both completions keep one shared prompt):
  * ``max_prompt_length``: a longer prompt keeps its first (keep_start) or last (keep_end) tokens;
  * ``max_length``: keep_start cuts each completion so prompt + completion <= max_length (identical to
    TRL 1.16's per-sequence ``[:max_length]``); keep_end drops the oldest prompt tokens so the longer
    completion fits whole (TRL 1.16 supports keep_start only; its per-sequence keep_end would give the
    two completions different prompts). A completion longer than the room left by one prompt token is cut
    at its end in both modes: the tokens scored are always the ones that follow the prompt.
Rows left without a prompt token or without a completion token are dropped and counted by reason.

Vision rows (a processor and an ``images`` column; ``encode_vision``) are tokenized as TRL 1.16's
``DataCollatorForVisionPreference`` does: conversational rows get TRL's ``prepare_multimodal_messages`` (one
``{"type": "image"}`` part per image before the text of the first user message whose content is a string) and
TRL's ``apply_chat_template`` (the prompt with the generation prompt, cut to its common prefix with each
prompt + completion rendering; each completion is the rest of its rendering); text rows keep their text (the
prompt marks its images with the placeholder, e.g. ``<image>``) and, as in TRL's vision path, **no EOS is
appended** to their completions. Prompt ids are ``processor(images=..., text=prompt, add_special_tokens=False)``
(placeholders expanded into the image tokens), completion ids ``processor.tokenizer(completion,
add_special_tokens=False)``. Truncation then never removes an image token (``truncate(..., image_ids=...)``):
``max_prompt_length`` counts only the prompt's text tokens and keep_start / keep_end drop only text tokens;
``max_length`` counts every token, and a prompt whose image tokens alone leave no room for a completion token is
dropped as ``image_tokens_exceed_budget``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass
class TruncationConfig:
    max_length: int | None = 512
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_start"

    def __post_init__(self):
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"data.truncation_mode={self.truncation_mode!r}: use 'keep_start' or 'keep_end'")
        for name in ("max_length", "max_prompt_length"):
            v = getattr(self, name)
            if v is not None and v < 2:
                raise ValueError(f"data.{name}={v}: must be at least 2 (or null for no limit)")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _ids(tokenizer, value: Any, *, generation_prompt: bool = False) -> list[int]:
    if isinstance(value, list):
        out = tokenizer.apply_chat_template(value, tokenize=True, return_dict=True,
                                            add_generation_prompt=generation_prompt)
        return list(out["input_ids"])
    return list(tokenizer(text=value)["input_ids"])


def _text_inputs(tokenizer, prompt: str, completions: list[str]) -> list[str]:
    """The texts a text row tokenizes: the prompt, then prompt + completion (EOS appended) for each."""
    eos = tokenizer.eos_token
    return [prompt] + [prompt + (c if c.endswith(eos) else c + eos) for c in completions]


def split_prompt(prompt_ids: list[int], full: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [completion ids]) from the prompt's own ids and each prompt + completion's ids."""
    n = min(_common_prefix(prompt_ids, f) for f in full)
    return prompt_ids[:n], [f[n:] for f in full]



def tokenize_completions(tokenizer, prompt: Any, completions: list[Any]) -> tuple[list[int], list[list[int]]]:
    """(prompt_ids, [completion_ids...]) for one prompt and its completions (EOS appended to text)."""
    if isinstance(prompt, str):
        prompt_ids, *full = [_ids(tokenizer, t) for t in _text_inputs(tokenizer, prompt, completions)]
        return split_prompt(prompt_ids, full)
    full = [_ids(tokenizer, prompt + c) for c in completions]
    return split_prompt(_ids(tokenizer, prompt, generation_prompt=True), full)


def _batched_text_ids(tokenizer, records: list[dict[str, Any]], comps: list[list[Any]]) -> dict[int, list]:
    """Ids of every text row's inputs from one batched call of a fast tokenizer (the same ids as one call
    per text: no special-token or padding difference), keyed by row; {} for slow tokenizers."""
    if not getattr(tokenizer, "is_fast", False):
        return {}
    rows = [i for i, r in enumerate(records) if isinstance(r["prompt"], str) and all(isinstance(c, str)
                                                                                      for c in comps[i])]
    texts = [_text_inputs(tokenizer, records[i]["prompt"], comps[i]) for i in rows]
    if not texts:
        return {}
    ids = iter(tokenizer(text=[t for group in texts for t in group])["input_ids"])
    return {i: [list(next(ids)) for _ in group] for i, group in zip(rows, texts)}


def truncate(prompt: list[int], completions: list[list[int]], cfg: TruncationConfig,
             image_ids: frozenset[int] | None = None):
    """Apply ``cfg`` to one row; returns (prompt, completions) or (None, reason) when the row is dropped.
    ``image_ids``: the ids of image tokens, which are never cut (see the module docstring)."""
    if image_ids and any(t in image_ids for t in prompt):
        return _truncate_vision(prompt, completions, cfg, image_ids)
    keep_end = cfg.truncation_mode == "keep_end"
    if cfg.max_prompt_length is not None and len(prompt) > cfg.max_prompt_length:
        prompt = prompt[-cfg.max_prompt_length:] if keep_end else prompt[: cfg.max_prompt_length]
    if cfg.max_length is not None:
        longest = max(len(c) for c in completions)
        if keep_end and len(prompt) + longest > cfg.max_length:
            budget = max(cfg.max_length - longest, 1)
            prompt = prompt[-budget:] if prompt else prompt
            completions = [c[: cfg.max_length - len(prompt)] for c in completions]  # each keeps its start
        elif not keep_end:
            if len(prompt) >= cfg.max_length:
                return None, "prompt_fills_max_length"
            completions = [c[: cfg.max_length - len(prompt)] for c in completions]
    return _kept(prompt, completions)


def _kept(prompt: list[int], completions: list[list[int]]):
    """(prompt, completions) after truncation, or (None, reason) when nothing is left to score."""
    if not prompt:
        return None, "empty_prompt"
    if any(len(c) == 0 for c in completions):
        return None, "empty_completion"
    return prompt, completions


def _drop_text(prompt: list[int], keep: list[bool], n: int, from_end: bool) -> tuple[list[int], list[bool]]:
    """``prompt`` without its first (or, ``from_end``, last) ``n`` unprotected tokens."""
    order = range(len(prompt) - 1, -1, -1) if from_end else range(len(prompt))
    gone: set[int] = set()
    for j in order:
        if len(gone) == n:
            break
        if not keep[j]:
            gone.add(j)
    return ([t for j, t in enumerate(prompt) if j not in gone], [k for j, k in enumerate(keep) if j not in gone])


def _truncate_vision(prompt: list[int], completions: list[list[int]], cfg: TruncationConfig,
                     image_ids: frozenset[int]):
    """``truncate`` for a prompt holding image tokens: only its text tokens are ever removed."""
    from dpo_lightning.data.images import protected_positions

    keep_end = cfg.truncation_mode == "keep_end"
    keep = protected_positions(prompt, image_ids)
    text = len(keep) - sum(keep)
    if cfg.max_prompt_length is not None and text > cfg.max_prompt_length:  # counts text tokens only
        prompt, keep = _drop_text(prompt, keep, text - cfg.max_prompt_length, from_end=not keep_end)
    if cfg.max_length is not None:
        if sum(keep) >= cfg.max_length:
            return None, "image_tokens_exceed_budget"
        longest = max(len(c) for c in completions)
        if keep_end and len(prompt) + longest > cfg.max_length:
            budget = max(cfg.max_length - longest, sum(keep), 1)  # the image tokens stay
            if len(prompt) > budget:
                prompt, keep = _drop_text(prompt, keep, len(prompt) - budget, from_end=False)
        elif not keep_end and len(prompt) >= cfg.max_length:
            return None, "prompt_fills_max_length"
        completions = [c[: cfg.max_length - len(prompt)] for c in completions]
    return _kept(prompt, completions)


# ------------------------------------------------------------------ vision rows (TRL's vision collator)
def prepare_messages(messages: list[dict], n_images: int) -> list[dict]:
    """TRL 1.16's ``prepare_multimodal_messages`` without filling the images in: string contents become text
    parts, and the first user message with a string content gets ``n_images`` image parts before its text."""
    out, included = [], False
    for m in messages:
        if isinstance(m.get("content"), str):
            parts = [{"type": "text", "text": m["content"]}]
            if m["role"] == "user" and not included:
                parts = [{"type": "image"} for _ in range(n_images)] + parts
                included = True
            m = {**m, "content": parts}
        out.append(m)
    return out


def count_placeholders(value: Any, placeholder: str | None) -> int:
    """Image parts of prepared messages, or placeholders in a text prompt."""
    if isinstance(value, list):
        return sum(1 for m in value if m["role"] != "tool" and isinstance(m["content"], list)
                   for p in m["content"] if p.get("type") == "image")
    return value.count(placeholder) if placeholder else 0


def _common(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def render_vision(processor, prompt: Any, completions: list[Any], n_images: int) -> tuple[Any, list[Any]]:
    """(prompt text, [completion texts]) of a vision row as TRL's collator renders them; text rows unchanged."""
    if not isinstance(prompt, list):
        return prompt, list(completions)
    prompt = prepare_messages(prompt, n_images)
    completions = [prepare_messages(c, 0) for c in completions]
    last = prompt[-1]["role"]
    text = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=last in ("user", "tool"),
                                         continue_final_message=last == "assistant")
    fulls = [processor.apply_chat_template(prompt + c, tokenize=False) for c in completions]
    for f in fulls:
        text = _common(text, f)
    return text, [f[len(text):] for f in fulls]


def encode_vision(record: dict[str, Any], processor, images: list) -> tuple[list[int], list[list[int]]]:
    """(prompt ids with the image tokens expanded, [completion ids]) of one vision row; ``images``: PIL images."""
    comps = [record["chosen"], record["rejected"]] if "chosen" in record else [record["completion"]]
    prompt, texts = render_vision(processor, record["prompt"], comps, len(images))
    tok = processor.tokenizer
    if images:
        # nested as one sample, as TRL's collator passes them: a family may expand a prompt with several images
        # apart from one with a single image (LLaVA-OneVision: anyres patches for single images only)
        prompt_ids = list(processor(text=[prompt], images=[images], add_special_tokens=False)["input_ids"][0])
    else:  # a text row: the tokenizer (PaliGemma's processor refuses a call without images; others equal it)
        prompt_ids = list(tok(text=prompt, add_special_tokens=False)["input_ids"])
    return prompt_ids, [list(tok(text=t, add_special_tokens=False)["input_ids"]) for t in texts]


def encode_records(records: list[dict[str, Any]], tokenizer) -> list[tuple[list[int], list[list[int]]]]:
    """Each record's (prompt ids, [prompt + completion ids]) before the prompt is split off (``split_prompt``):
    text rows from one batched call of a fast tokenizer, the others one by one."""
    all_comps = [[r["chosen"], r["rejected"]] if "chosen" in r else [r["completion"]] for r in records]
    batched = _batched_text_ids(tokenizer, records, all_comps)
    out = []
    for i, r in enumerate(records):
        if i in batched:
            prompt_ids, *full = batched.pop(i)
        elif isinstance(r["prompt"], str):
            prompt_ids, *full = [_ids(tokenizer, t) for t in _text_inputs(tokenizer, r["prompt"], all_comps[i])]
        else:
            full = [_ids(tokenizer, r["prompt"] + c) for c in all_comps[i]]
            prompt_ids = _ids(tokenizer, r["prompt"], generation_prompt=True)
        out.append((prompt_ids, full))
    return out


def tokenize_records(records: list[dict[str, Any]], tokenizer, cfg: TruncationConfig) -> tuple[list[dict], Counter]:
    """Tokenize and truncate records (paired or unpaired); returns (rows, dropped-count by reason)."""
    rows: list[dict] = []
    dropped: Counter[str] = Counter()
    for i, (r, (prompt_ids, full)) in enumerate(zip(records, encode_records(records, tokenizer))):
        p, cs = truncate(*split_prompt(prompt_ids, full), cfg)
        if p is None:
            dropped[cs] += 1
            continue
        row = {"index": i, "prompt_ids": p}
        if "chosen" in r:
            row["chosen_ids"], row["rejected_ids"] = cs
        else:
            row["completion_ids"], row["label"] = cs[0], bool(r["label"])
        rows.append(row)
    return rows, dropped
