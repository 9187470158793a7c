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
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from dpo_lightning.data.formats import DataError, is_messages, normalize
from dpo_lightning.data.formats import parse_jsonl_line as parse_line
from dpo_lightning.data.tokenize import TruncationConfig, encode_records, split_prompt, truncate

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


@dataclass
class ChunkResult:
    rows: int = 0
    events: list[Event] = field(default_factory=list)
    hashes: list[tuple[int, int]] = field(default_factory=list)  # (row, 64-bit hash of the row's content)
    kept: list[tuple[int, dict, Any]] = field(default_factory=list)  # (row, record, (prompt ids, [completion ids]))
    unpaired: bool = False  # the source's rows are unpaired (prompt/completion/label)


def _texts(value: Any) -> list[str]:
    return [m["content"] for m in value] if is_messages(value) else [value] if isinstance(value, str) else []


def pair_hash(rec: dict) -> int:
    """A 64-bit hash of a row's content: (prompt, chosen, rejected), or (prompt, completion, label)."""
    fields = ("prompt", "chosen", "rejected") if "chosen" in rec else ("prompt", "completion", "label")
    key = repr(tuple(rec[f] for f in fields)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True)


def special_tokens(tokenizer) -> list[str]:
    if tokenizer is None:
        return []
    return sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if t}, key=len, reverse=True)


class _Checker:
    def __init__(self, ctx: ChunkContext, out: ChunkResult):
        self.ctx, self.out = ctx, out
        self.specials, self.eos = special_tokens(ctx.tokenizer), getattr(ctx.tokenizer, "eos_token", None)

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
                empty = empty or not any(m["content"].strip() for m in value)
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

    def tokens(self, i: int, rec: dict, encoded) -> Any:
        """The row's (prompt ids, [completion ids]) after truncation, or None when a token-level reason stops it."""
        prompt_full, full = encoded
        prompt_ids, comp_ids = split_prompt(prompt_full, full)
        if len(prompt_ids) < len(prompt_full) and self.flag(
                i, 1, "prompt_boundary_mismatch", f"tokens of prompt + completion diverge from the prompt's own "
                f"at token {len(prompt_ids)} of {len(prompt_full)}"):
            return None
        cfg = self.ctx.truncation
        p, cs = truncate(prompt_ids, comp_ids, cfg)
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
    encoded = encode_records([rec for _, rec in encodable], tok)
    for (i, rec), enc in zip(encodable, encoded):
        ids = checker.tokens(i, rec, enc)
        if ids is not None:
            out.kept.append((i, rec, (enc, ids)))
    out.events.sort(key=lambda e: (e[0], e[1]))  # the chat-template and token events came after the text ones
    return out
