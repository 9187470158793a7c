"""The row checks of ``validate.py`` on one chunk of a source, as run inside a tokenizing worker process.

    result = check_chunk(raw_rows, start=512, ctx=ChunkContext(where, policies, tokenizer, truncation, ...))

Each row is normalized (``formats.py``), checked for the text-level reasons, encoded once (the batched
encoding of ``tokenize.py``) and checked for the token-level reasons on those very ids, which then become the
row's tokens: the data is tokenized once. A row stops at its first ``drop`` or ``error`` reason, as in a
one-pass check; nothing is counted or raised here. The chunk's ``events`` (row, stage, reason, detail) and the
hash of each row that reaches the duplicate check go back to the parent, which applies them in row order
(``DataValidator.absorb``): it counts, keeps the example rows, raises the first ``error`` of the source, and
decides ``duplicate_pair`` across chunks (the first occurrence is kept). ``stage`` 0 events come before the
duplicate check, stage 1 after it (a duplicate that is dropped never reaches them).

Vision sources (``ctx.vision``: a processor in ``ctx.tokenizer`` and rows whose images ``images.py`` has already
read as bytes) add three reasons: ``image_unreadable`` (an image that cannot be read or decoded, naming the field
``images[j]``), ``image_count_mismatch`` (image parts / placeholders in the prompt != images given) and
``image_tokens_exceed_budget`` (the prompt's image tokens alone leave no room within ``max_length``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from dpo_lightning.data import images as imgs
from dpo_lightning.data.formats import DataError, is_messages, message_text, normalize
from dpo_lightning.data.formats import parse_jsonl_line as parse_line
from dpo_lightning.data.tokenize import (
    TruncationConfig,
    count_placeholders,
    encode_records,
    encode_vision,
    prepare_messages,
    split_prompt,
    truncate,
)
from dpo_lightning.models.vision import is_processor, text_tokenizer

Event = tuple[int, int, "str | None", str]  # (row, stage, reason or None for a plain error, detail)


@dataclass
class ChunkContext:
    """What every chunk of one source is checked against (sent once to each worker)."""

    where: str
    policies: dict[str, str]
    tokenizer: Any = None
    truncation: TruncationConfig | None = None
    unpaired_file: bool = False  # decided by the source's first row: every row is read as unpaired
    paired_kind: bool | None = None  # the kind of the source's first readable row (None: learn it here)
    vision: bool = False  # rows carry images (as bytes); ``tokenizer`` is the processor
    image_ids: frozenset[int] = frozenset()  # ids of image tokens (never truncated)


@dataclass
class ChunkResult:
    rows: int = 0
    events: list[Event] = field(default_factory=list)
    hashes: list[tuple[int, int]] = field(default_factory=list)  # (row, 64-bit hash of the row's content)
    kept: list[tuple[int, dict, Any]] = field(default_factory=list)  # (row, record, (prompt ids, [completion ids]))
    unpaired: bool = False  # the source's rows are unpaired (prompt/completion/label)


def _texts(value: Any) -> list[str]:
    return [message_text(m) for m in value] if is_messages(value) else [value] if isinstance(value, str) else []


def pair_hash(rec: dict) -> int:
    """A 64-bit hash of a row's content: (prompt, chosen, rejected), or (prompt, completion, label); with its
    images' digests when it has images."""
    fields = ("prompt", "chosen", "rejected") if "chosen" in rec else ("prompt", "completion", "label")
    parts = tuple(rec[f] for f in fields)
    if rec.get("images"):
        parts += tuple(imgs.image_digest(b) for b in rec["images"])
    key = repr(parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True)


def special_tokens(tokenizer) -> list[str]:
    """The special tokens a text must not contain; for a processor, those of its tokenizer less the image
    placeholders and the tokens images expand to (a text prompt marks its images so)."""
    if tokenizer is None:
        return []
    tok = text_tokenizer(tokenizer)
    found = {t for t in getattr(tok, "all_special_tokens", []) if t}
    if is_processor(tokenizer):
        image_ids = imgs.image_token_ids(tokenizer)
        found = {t for t in found if tok.convert_tokens_to_ids(t) not in image_ids} - {imgs.placeholder(tokenizer)}
    return sorted(found, key=len, reverse=True)


class _Checker:
    def __init__(self, ctx: ChunkContext, out: ChunkResult):
        self.ctx, self.out = ctx, out
        self.specials = special_tokens(ctx.tokenizer)
        self.eos = None if ctx.vision else getattr(text_tokenizer(ctx.tokenizer), "eos_token", None)
        self.placeholder = imgs.placeholder(ctx.tokenizer) if ctx.vision else None

    def flag(self, i: int, stage: int, reason: str, detail: str) -> bool:
        """Record ``reason`` for row ``i``; True when the row stops here (``drop`` or ``error``)."""
        self.out.events.append((i, stage, reason, detail))
        return self.ctx.policies[reason] != "keep"

    def record(self, i: int, row: Any, start_kind: list) -> dict | None:
        """Row ``i`` normalized and through the text-level reasons, or None when it stops."""
        try:
            rec = normalize([row], self.ctx.where, start=i, unpaired=True if self.ctx.unpaired_file else None)[0]
        except DataError as err:
            detail = re.sub(r"^.*?: row \d+: ", "", str(err))
            reason = "missing_field" if "missing field" in detail else "non_string_field"
            self.flag(i, 0, reason, detail)  # error, or drop (never keep: NO_KEEP)
            return None
        if self.ctx.vision and "images" in rec and not self.images(i, rec, row):
            return None
        if not self.ctx.vision and rec.pop("images", None) and self.ctx.tokenizer is not None:
            self.out.events.append((i, 0, None, f"{self.ctx.where}: row {i}: field 'images': the row has images, "
                                   "which a text tokenizer cannot read; give the model's processor (a "
                                   "vision-language model) instead of its tokenizer"))
            return None
        kind = "chosen" in rec
        if start_kind[0] is None:
            start_kind[0] = kind
        if kind != start_kind[0] and self.flag(i, 0, "mixed_formats", "paired and unpaired rows in one file "
                                               f"(this row is {'paired' if kind else 'unpaired'})"):
            return None
        comps = ["chosen", "rejected"] if kind else ["completion"]
        for f in ["prompt", *comps]:
            value = rec[f]
            empty = (not value) if isinstance(value, list) else not value.strip()
            if f != "prompt" and isinstance(value, list):
                empty = empty or not any(message_text(m).strip() for m in value)
            if empty and self.flag(i, 0, "empty_field", f"field {f!r} is empty"):
                return None
        if kind:
            if rec["chosen"] == rec["rejected"] and self.flag(i, 0, "identical_completions",
                                                              "fields 'chosen' and 'rejected' are identical"):
                return None
        self.out.hashes.append((i, pair_hash(rec)))  # duplicate_pair: pairs and unpaired rows alike
        for f in ["prompt", *comps]:
            for text in _texts(rec[f]):
                body = text
                if f != "prompt" and isinstance(rec[f], str) and self.eos and text.endswith(self.eos):
                    body = text[: -len(self.eos)]  # the EOS tokenize.py appends anyway
                hit = next((t for t in self.specials if t in body), None)
                if hit and self.flag(i, 1, "special_tokens", f"field {f!r} contains the special token {hit!r}"):
                    return None
        return rec

    def images(self, i: int, rec: dict, row: Any) -> bool:
        """The vision reasons of a row's images; False when the row stops."""
        column = "image" if isinstance(row, dict) and row.get("image_column") == "image" else "images"
        for j, data in enumerate(rec["images"]):
            problem = imgs.check_decodable(data)
            if problem is not None:
                field = "image" if column == "image" else f"images[{j}]"
                if self.flag(i, 0, "image_unreadable", f"field {field!r}: {problem}"):
                    return False
        n, prompt = len(rec["images"]), rec["prompt"]
        if isinstance(prompt, list):
            found = count_placeholders(prepare_messages(prompt, n), None)
        else:
            found = count_placeholders(prompt, self.placeholder)
            if found == 0 and imgs.adds_image_tokens_itself(self.ctx.tokenizer):
                found = n
        if found != n:
            mark = "image parts" if isinstance(prompt, list) else f"{self.placeholder!r} placeholders"
            if self.flag(i, 0, "image_count_mismatch", f"field 'prompt': {found} {mark} for {n} image(s) in "
                                                       f"field {column!r}"):
                return False
        return True

    def tokens(self, i: int, rec: dict, encoded) -> Any:
        """The row's (prompt ids, [completion ids]) after truncation, or None when a token-level reason stops it."""
        prompt_full, full = encoded
        prompt_ids, comp_ids = split_prompt(prompt_full, full)
        if len(prompt_ids) < len(prompt_full) and self.flag(
                i, 1, "prompt_boundary_mismatch", f"tokens of prompt + completion diverge from the prompt's own "
                f"at token {len(prompt_ids)} of {len(prompt_full)}"):
            return None
        cfg = self.ctx.truncation
        assert cfg is not None  # check_chunk tokenizes only with a truncation config
        p, cs = truncate(prompt_ids, comp_ids, cfg, self.ctx.image_ids)
        if p is None and cs == "image_tokens_exceed_budget":
            n = sum(imgs.protected_positions(prompt_ids, self.ctx.image_ids))
            self.flag(i, 1, cs, f"field 'prompt': its {n} image tokens leave no room for a completion token within "
                                f"data.max_length={cfg.max_length}")
            return None
        if p is None and cs == "prompt_fills_max_length":
            self.flag(i, 1, cs, f"field 'prompt': {len(prompt_ids)} tokens leave no room for a completion "
                                f"within data.max_length={cfg.max_length}")
            return None
        if p is None:
            self.flag(i, 1, "empty_after_truncation", f"truncation leaves no tokens ({cs})")
            return None
        names = ["chosen", "rejected"] if len(comp_ids) == 2 else ["completion"]
        cut = [f for f, before, after in zip(names, comp_ids, cs) if len(after) < len(before)]
        if cut and self.flag(i, 1, "completion_truncated", f"field {cut[0]!r} is cut to fit "
                                                           f"data.max_length={cfg.max_length}"):
            return None
        return p, cs


def check_chunk(rows: list, start: int, ctx: ChunkContext, *, lines: bool = False) -> ChunkResult:
    """Check rows ``start``, ``start + 1``, ... of ``ctx.where`` (see the module docstring). ``lines``: the
    rows are (line number, JSONL text) pairs, parsed here (a bad line is an error event naming row and line)."""
    out = ChunkResult(rows=len(rows), unpaired=ctx.unpaired_file)
    checker, kind = _Checker(ctx, out), [ctx.paired_kind]
    passed: list[tuple[int, dict]] = []
    for j, row in enumerate(rows):
        i = start + j
        if lines:
            try:
                row = parse_line(row[1], ctx.where, i, row[0])
            except DataError as err:
                out.events.append((i, 0, None, str(err)))
                continue
        rec = checker.record(i, row, kind)
        if rec is not None:
            passed.append((i, rec))
    tok = ctx.tokenizer
    if tok is None or ctx.truncation is None:
        out.kept = [(i, rec, None) for i, rec in passed]
        return out
    encodable = []
    for i, rec in passed:
        comps = [rec["chosen"], rec["rejected"]] if "chosen" in rec else [rec["completion"]]
        if any(isinstance(v, list) for v in [rec["prompt"], *comps]) and not getattr(tok, "chat_template", None):
            out.events.append((i, 1, None, f"{ctx.where}: row {i}: field 'prompt': conversational rows (lists of "
                               "messages) need a tokenizer with a chat template, and this tokenizer has none; give "
                               "text fields or a model whose tokenizer has one"))
            continue
        encodable.append((i, rec))
    if ctx.vision:
        encoded = []
        for _, rec in encodable:
            prompt_ids, comps = encode_vision(rec, tok, [imgs.decode(b) for b in rec.get("images") or []])
            encoded.append((prompt_ids, [prompt_ids + c for c in comps]))
    else:
        encoded = encode_records([rec for _, rec in encodable], tok)
    for (i, rec), enc in zip(encodable, encoded):
        ids = checker.tokens(i, rec, enc)
        if ids is not None:
            out.kept.append((i, rec, (enc, ids)))
    out.events.sort(key=lambda e: (e[0], e[1]))  # the chat-template and token events came after the text ones
    return out
