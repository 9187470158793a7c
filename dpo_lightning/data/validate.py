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
    duplicate_pair           [drop]   the same (prompt, chosen, rejected) again, or for unpaired rows the same
                                      (prompt, completion, label): the first is kept (a copy would otherwise
                                      weigh twice, and could sit on both sides of the held-out split)
    special_tokens           [drop]   a literal special token (e.g. "</s>", "<|endoftext|>") inside the text,
                                      which the tokenizer turns into a control token (a trailing EOS on a
                                      completion is allowed: it is the one EOS appended anyway)
    prompt_fills_max_length  [drop]   no room left for any completion token after the prompt
    empty_after_truncation   [drop]   truncation leaves no prompt or no completion token
    completion_truncated     [keep]   a completion is cut to fit max_length
    prompt_boundary_mismatch [keep]   tokenizing prompt + completion does not start with the prompt's tokens
                                      (a token merges across the boundary; the completion then starts where
                                      the two diverge, TRL's rule)

Vision rows (an ``images`` / ``image`` column, tokenized with a processor) add:

    image_unreadable           [error] an image that cannot be read or decoded (missing file, bad bytes, bad
                                       base64); the detail names the field (``images[1]``)
    image_count_mismatch       [error] image parts (conversational) or placeholders (text, e.g. ``<image>``) in
                                       the prompt != images given
    image_tokens_exceed_budget [drop]  the prompt's image tokens alone leave no room for a completion token
                                       within max_length (image tokens are never truncated)

All rows dropped is an error. ``report`` holds the counts, the policies and the first row numbers per reason;
``write_report`` saves it as JSON (atomically).

The checks themselves (``checks.py``) run chunk by chunk inside the tokenizing worker processes (``cache.py``),
on the same encoding the rows are then stored with; this class merges the chunks' results in row order
(``begin`` / ``absorb`` / ``finish``), so counts, example rows, the first error and the cross-row reasons
(``duplicate_pair``, ``mixed_formats``) are those of one pass over the whole source. ``check`` is that pass
over rows in memory.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from dpo_lightning.data.checks import ChunkContext, ChunkResult, check_chunk
from dpo_lightning.data.formats import DataError

POLICIES = ("error", "drop", "keep")
DEFAULT_POLICIES = {
    "missing_field": "error", "non_string_field": "error", "mixed_formats": "error", "empty_field": "drop",
    "identical_completions": "drop", "duplicate_pair": "drop", "special_tokens": "drop",
    "prompt_fills_max_length": "drop", "empty_after_truncation": "drop", "completion_truncated": "keep",
    "prompt_boundary_mismatch": "keep",
    "image_unreadable": "error", "image_count_mismatch": "error", "image_tokens_exceed_budget": "drop",
}
VISION_REASONS = ("image_unreadable", "image_count_mismatch", "image_tokens_exceed_budget")
# A row with these problems cannot be trained on: it is refused or dropped, never kept.
NO_KEEP = {"missing_field", "non_string_field", "mixed_formats", "prompt_fills_max_length", "empty_after_truncation",
           *VISION_REASONS}
EXAMPLES = 20  # row numbers kept per reason in the report


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


def first_kind(rows, where: str, unpaired_file: bool) -> bool | None:
    """Whether the first row of ``rows`` that reads at all is paired (None: none reads), as ``check_chunk``
    would read it: the kind the rest of the source must match (``mixed_formats``)."""
    from dpo_lightning.data.formats import normalize

    for i, row in enumerate(rows):
        try:
            return "chosen" in normalize([row], where, start=i, unpaired=True if unpaired_file else None)[0]
        except DataError:
            continue
    return None


def is_unpaired_file(first_row: Any) -> bool:
    return isinstance(first_row, dict) and "completion" in first_row and "label" in first_row


class DataValidator:
    """Applies the per-reason policies to rows of one or more sources and keeps the report."""

    def __init__(self, policies: dict[str, str] | None = None):
        self.policies = check_policies(policies)
        self.report: dict[str, Any] = {"policies": self.policies, "sources": {}}

    # ---------------------------------------------------------------- one source, in memory
    def check(self, rows: list[dict[str, Any]], where: str, tokenizer=None, truncation=None) -> list[dict[str, Any]]:
        """Normalized records of ``rows`` that pass (policies applied); raises ``DataError`` on an ``error``
        reason or when no row is left. Token-level reasons need ``tokenizer`` and ``truncation``."""
        if not rows:
            raise DataError(f"{where}: the dataset is empty")
        unpaired = is_unpaired_file(rows[0])
        ctx = ChunkContext(where, self.policies, tokenizer, truncation, unpaired, first_kind(rows, where, unpaired))
        self.begin(where)
        result = check_chunk(rows, 0, ctx)
        gone = self.absorb(result)
        self.finish(where, len(rows))
        return [rec for i, rec, _ in result.kept if i not in gone]

    # ---------------------------------------------------------------- chunk results, merged in row order
    def begin(self, where: str) -> None:
        self._counts: Counter[str]
        self._examples: dict[str, list[int]]  # reason -> the first rows it names
        self._seen: set[Any]  # hashes of the rows kept so far (duplicates)
        self._where, self._counts, self._examples, self._seen, self._dropped = where, Counter(), {}, set(), 0

    def absorb(self, chunk: ChunkResult) -> set[int]:
        """Apply one chunk's events (chunks in row order); returns the rows the chunk kept that the
        cross-chunk duplicate check drops. Raises the first ``error`` of the chunk."""
        events: dict[int, list] = {}
        for e in chunk.events:
            events.setdefault(e[0], []).append(e)
        hashes = dict(chunk.hashes)
        fields = "prompt, completion and label" if chunk.unpaired else "prompt, chosen and rejected"
        gone: set[int] = set()
        for i in sorted(events.keys() | hashes.keys()):
            stages = [[e for e in events.get(i, []) if e[1] == s] for s in (0, 1)]
            if self._apply(stages[0]):
                continue
            h = hashes.get(i)
            if h is not None:
                if h in self._seen:
                    if self._flag(i, "duplicate_pair", f"the same {fields} as an earlier row"):
                        self._dropped += 1
                        gone.add(i)
                        continue
                self._seen.add(h)
            self._apply(stages[1])
        return gone

    def _apply(self, events: list) -> bool:
        for i, _, reason, detail in events:
            if reason is None:  # an error that no policy covers (unreadable line, no chat template)
                raise DataError(detail)
            if self._flag(i, reason, detail):
                self._dropped += 1
                return True
        return False

    def finish(self, where: str, rows: int) -> dict[str, Any]:
        """The source's report (also in ``report["sources"][where]``); raises when no row is left."""
        kept = rows - self._dropped
        rep = self.report["sources"][where] = {
            "rows": rows, "kept": kept, "dropped": self._dropped,
            "by_reason": {r: {"count": c, "policy": self.policies[r], "rows": self._examples[r]}
                          for r, c in sorted(self._counts.items())}}
        self._seen = set()
        if not kept:
            raise DataError(f"{where}: every row was dropped by validation ({dict(self._counts)}); see "
                            "data_report.json, fix the data or change data.validation.<reason>")
        return rep

    def _flag(self, row: int, reason: str, detail: str) -> bool:
        """Count ``reason`` for ``row``; True when the row is dropped, raises under ``error``."""
        policy = self.policies[reason]
        if policy == "error":
            raise DataError(f"{self._where}: row {row}: {detail} [{reason}; set data.validation.{reason}=drop "
                            "to drop such rows instead]")
        self._counts[reason] += 1
        examples = self._examples.setdefault(reason, [])
        if len(examples) < EXAMPLES:
            examples.append(row)
        return policy == "drop"

    # ---------------------------------------------------------------- the report
    def summary(self) -> str:
        parts = []
        for where, rep in self.report["sources"].items():
            reasons = ", ".join(f"{r} {v['count']} ({v['policy']})" for r, v in rep["by_reason"].items()) or "none"
            parts.append(f"{where}: {rep['rows']} rows, {rep['kept']} kept; {reasons}")
        return "; ".join(parts)

    def write_report(self, path) -> None:
        from dpo_lightning.files.atomic import atomic_write_json

        atomic_write_json(path, self.report)
