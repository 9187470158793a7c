"""Check every row before training, count problems by reason, apply each reason's policy, write a report.

    validator = DataValidator({"special_tokens": "error"}, report_path="run/data_report.json")
    records = validator.check(raw_rows, where="pairs.jsonl", tokenizer=tok, truncation=cfg)  # normalized, kept

Reasons (default policy in brackets; ``error`` stops with file + row + field, ``drop`` removes the row and counts
it, ``keep`` only counts it):

    missing_field            [error]  a required field is absent or null
    non_string_field         [error]  a field is neither text nor a list of {role, content} messages (or a
                                      label is not true/false), or chosen/rejected mix text and messages
    mixed_formats            [error]  paired and unpaired (prompt/completion/label) rows in one file
    empty_field              [drop]   a prompt or completion that is empty or only whitespace
    identical_completions    [drop]   chosen == rejected: no preference to learn
    duplicate_pair           [keep]   the same (prompt, chosen, rejected) again (with drop: the first is kept)
    special_tokens           [drop]   a literal special token (e.g. "</s>", "<|endoftext|>") inside the text,
                                      which the tokenizer turns into a control token (a trailing EOS on a
                                      completion is allowed: it is the one EOS appended anyway)
    prompt_fills_max_length  [drop]   no room left for any completion token after the prompt
    empty_after_truncation   [drop]   truncation leaves no prompt or no completion token
    completion_truncated     [keep]   a completion is cut to fit max_length
    prompt_boundary_mismatch [keep]   tokenizing prompt + completion does not start with the prompt's tokens
                                      (a token merges across the boundary; the completion then starts where
                                      the two diverge, TRL's rule)

All rows dropped is an error. ``report`` holds the counts, the policies and the first row numbers per reason;
``write_report`` saves it as JSON (atomically).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from dpo_lightning.data.formats import DataError, is_messages, normalize

POLICIES = ("error", "drop", "keep")
DEFAULT_POLICIES = {
    "missing_field": "error", "non_string_field": "error", "mixed_formats": "error", "empty_field": "drop",
    "identical_completions": "drop", "duplicate_pair": "keep", "special_tokens": "drop",
    "prompt_fills_max_length": "drop", "empty_after_truncation": "drop", "completion_truncated": "keep",
    "prompt_boundary_mismatch": "keep",
}
# A row with these problems cannot be trained on: it is refused or dropped, never kept.
NO_KEEP = {"missing_field", "non_string_field", "mixed_formats", "prompt_fills_max_length", "empty_after_truncation"}
EXAMPLES = 20  # row numbers kept per reason in the report
CACHE_VERSION = "1"


def check_policies(policies: dict[str, str] | None) -> dict[str, str]:
    """The default policies updated with ``policies``; unknown reasons or policies raise naming the key."""
    out = dict(DEFAULT_POLICIES)
    for reason, policy in (policies or {}).items():
        if reason not in DEFAULT_POLICIES:
            raise ValueError(f"data.validation.{reason}: unknown reason; use one of {sorted(DEFAULT_POLICIES)}")
        allowed = ("error", "drop") if reason in NO_KEEP else POLICIES
        if policy not in allowed:
            raise ValueError(f"data.validation.{reason}={policy!r}: use one of {allowed}")
        out[reason] = policy
    return out


def _texts(value: Any) -> list[str]:
    return [m["content"] for m in value] if is_messages(value) else [value] if isinstance(value, str) else []


def _structural_reason(message: str) -> str:
    return "missing_field" if "missing field" in message else "non_string_field"


class DataValidator:
    """Applies the per-reason policies to rows of one or more sources and keeps the report."""

    def __init__(self, policies: dict[str, str] | None = None):
        self.policies = check_policies(policies)
        self.report: dict[str, Any] = {"policies": self.policies, "sources": {}}

    # ---------------------------------------------------------------- one source
    def check(self, rows: list[dict[str, Any]], where: str, tokenizer=None, truncation=None,
              cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
        """Normalized records of ``rows`` that pass (policies applied); raises ``DataError`` on an ``error``
        reason or when no row is left. Token-level reasons need ``tokenizer`` and ``truncation``. With
        a tokenizer, a passing result (kept rows + report) is cached under a hash of rows, tokenizer,
        truncation and policies in ``cache_dir`` (default: the tokenization cache's root), so a second run
        does not tokenize twice."""
        if not rows:
            raise DataError(f"{where}: the dataset is empty")
        cache = self._cache_file(rows, tokenizer, truncation, cache_dir) if tokenizer is not None else None
        if cache is not None and cache.exists():
            blob = json.loads(cache.read_text())
            self.report["sources"][where] = blob["report"]
            return [normalize([rows[0], rows[i]] if blob["unpaired"] and i else [rows[i]], where)[-1]
                    for i in blob["kept"]]
        records = self._check(rows, where, tokenizer, truncation)
        if cache is not None:
            from dpo_lightning.io import atomic_write_json

            unpaired = isinstance(rows[0], dict) and "completion" in rows[0] and "label" in rows[0]
            atomic_write_json(cache, {"kept": self._kept, "unpaired": unpaired,
                                      "report": self.report["sources"][where]})
        return records

    def _cache_file(self, rows, tokenizer, truncation, cache_dir) -> Path:
        from dpo_lightning.data.datamodule import tokenizer_fingerprint

        parts = [CACHE_VERSION, rows, tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
                 getattr(truncation, "__dict__", None), self.policies]
        key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
        root = Path(cache_dir) if cache_dir else Path(os.environ.get(
            "DPO_LIGHTNING_CACHE", Path.home() / ".cache" / "dpo_lightning"))  # as the tokenization cache
        return root / "validated" / f"{key}.json"

    def _check(self, rows, where, tokenizer, truncation) -> list[dict[str, Any]]:
        self._where, self._counts, self._examples = where, Counter(), {}
        kept: list[tuple[int, dict]] = []
        kind, seen = None, set()
        specials, self._eos = self._specials(tokenizer), getattr(tokenizer, "eos_token", None)
        unpaired_file = isinstance(rows[0], dict) and "completion" in rows[0] and "label" in rows[0]
        for i, row in enumerate(rows):
            try:  # formats.py's own checks, row by row (an unpaired file's rows are read as unpaired)
                rec = normalize([rows[0], row] if unpaired_file and i else [row], where)[-1]
            except DataError as err:
                detail = re.sub(r"^.*?: row \d+: ", "", str(err))
                self._flag(i, _structural_reason(detail), detail)  # raises, or drops (never "keep": NO_KEEP)
                continue
            rec_kind = "chosen" in rec
            kind = rec_kind if kind is None else kind
            if rec_kind != kind and self._flag(i, "mixed_formats", "paired and unpaired rows in one file "
                                               f"(this row is {'paired' if rec_kind else 'unpaired'})"):
                continue
            if self._record_reasons(i, rec, specials, seen):
                continue
            if tokenizer is not None and truncation is not None and self._token_reasons(i, rec, tokenizer, truncation):
                continue
            kept.append((i, rec))
        self.report["sources"][where] = {
            "rows": len(rows), "kept": len(kept), "dropped": len(rows) - len(kept),
            "by_reason": {r: {"count": c, "policy": self.policies[r], "rows": self._examples[r]}
                          for r, c in sorted(self._counts.items())}}
        if not kept:
            raise DataError(f"{where}: every row was dropped by validation ({dict(self._counts)}); see "
                            "data_report.json, fix the data or change data.validation.<reason>")
        self._kept = [i for i, _ in kept]
        return [rec for _, rec in kept]

    def _flag(self, row: int, reason: str, detail: str) -> bool:
        """Count ``reason`` for ``row``; True when the row is dropped, raises under ``error``."""
        policy = self.policies[reason]
        if policy == "error":
            raise DataError(f"{self._where}: row {row}: {detail} [{reason}; set data.validation.{reason}=drop "
                            "to drop such rows instead]")
        self._counts[reason] += 1
        self._examples.setdefault(reason, [])
        if len(self._examples[reason]) < EXAMPLES:
            self._examples[reason].append(row)
        return policy == "drop"

    # ---------------------------------------------------------------- text-level reasons
    @staticmethod
    def _specials(tokenizer) -> list[str]:
        if tokenizer is None:
            return []
        return sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if t}, key=len, reverse=True)

    def _record_reasons(self, i: int, rec: dict, specials: list[str], seen: set) -> bool:
        comps = ["chosen", "rejected"] if "chosen" in rec else ["completion"]
        for field in ["prompt", *comps]:
            value = rec[field]
            empty = (not value) if isinstance(value, list) else not value.strip()
            if field != "prompt" and isinstance(value, list):
                empty = empty or not any(m["content"].strip() for m in value)
            if empty and self._flag(i, "empty_field", f"field {field!r} is empty"):
                return True
        if "chosen" in rec:
            if rec["chosen"] == rec["rejected"] and self._flag(i, "identical_completions",
                                                               "fields 'chosen' and 'rejected' are identical"):
                return True
            key = repr((rec["prompt"], rec["chosen"], rec["rejected"]))
            if key in seen and self._flag(i, "duplicate_pair", "the same prompt, chosen and rejected as an "
                                                               "earlier row"):
                return True
            seen.add(key)
        for field in ["prompt", *comps]:
            for text in _texts(rec[field]):
                body = text
                if field != "prompt" and isinstance(rec[field], str) and self._eos and text.endswith(self._eos):
                    body = text[: -len(self._eos)]  # the EOS tokenize.py appends anyway
                hit = next((t for t in specials if t in body), None)
                if hit and self._flag(i, "special_tokens", f"field {field!r} contains the special token {hit!r}"):
                    return True
        return False

    # ---------------------------------------------------------------- token-level reasons
    def _token_reasons(self, i: int, rec: dict, tokenizer, truncation) -> bool:
        from dpo_lightning.data.tokenize import _ids, tokenize_completions, truncate

        comps = [rec["chosen"], rec["rejected"]] if "chosen" in rec else [rec["completion"]]
        if any(isinstance(v, list) for v in [rec["prompt"], *comps]) and not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{self._where}: row {i}: field 'prompt': conversational rows (lists of messages) need "
                            "a tokenizer with a chat template, and this tokenizer has none; give text fields or "
                            "a model whose tokenizer has one")
        prompt_ids, comp_ids = tokenize_completions(tokenizer, rec["prompt"], comps)
        full_prompt = _ids(tokenizer, rec["prompt"], generation_prompt=isinstance(rec["prompt"], list))
        if len(prompt_ids) < len(full_prompt) and self._flag(
                i, "prompt_boundary_mismatch", f"tokens of prompt + completion diverge from the prompt's own "
                f"at token {len(prompt_ids)} of {len(full_prompt)}"):
            return True
        p, cs = truncate(prompt_ids, comp_ids, truncation)
        if p is None and cs == "prompt_fills_max_length":
            return self._flag(i, cs, f"field 'prompt': {len(prompt_ids)} tokens leave no room for a completion "
                                     f"within data.max_length={truncation.max_length}")
        if p is None:
            return self._flag(i, "empty_after_truncation", f"truncation leaves no tokens ({cs})")
        cut = [f for f, before, after in zip(["chosen", "rejected"] if len(comps) == 2 else ["completion"], comp_ids,
                                             cs) if len(after) < len(before)]
        return bool(cut) and self._flag(i, "completion_truncated", f"field {cut[0]!r} is cut to fit "
                                                                     f"data.max_length={truncation.max_length}")

    # ---------------------------------------------------------------- the report
    def summary(self) -> str:
        parts = []
        for where, rep in self.report["sources"].items():
            reasons = ", ".join(f"{r} {v['count']} ({v['policy']})" for r, v in rep["by_reason"].items()) or "none"
            parts.append(f"{where}: {rep['rows']} rows, {rep['kept']} kept; {reasons}")
        return "; ".join(parts)

    def write_report(self, path) -> None:
        from dpo_lightning.io import atomic_write_json

        atomic_write_json(path, self.report)
