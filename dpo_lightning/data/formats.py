"""Read preference records from files, saved ``datasets`` folders or the hub, and normalize them.

Three input shapes are accepted, each row checked:

* explicit prompt      ``{"prompt": str, "chosen": str, "rejected": str}``
* implicit prompt      ``{"chosen": str, "rejected": str}`` sharing the dialogue up to the last assistant
                       turn (Anthropic HH-RLHF): the prompt is extracted (``extract_prompt``)
* conversational       any of the fields above as lists of ``{"role", "content"}`` messages
* unpaired (KTO)       ``{"prompt", "completion", "label": bool}``
* vision (TRL)         any of the above with an ``images`` (list) or ``image`` column; a message's content may
                       then be a list of parts ``{"type": "text", "text": str}`` / ``{"type": "image"}``, and a
                       text prompt marks its images with the model's placeholder (``<image>``). The images are
                       read as bytes (``images.py``) and carried as the record's ``images``.

A structural problem (missing field, wrong type) raises ``DataError`` naming the file, row and field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ASSISTANT_MARKERS = ("\n\nAssistant:",)
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Bad input data: the message names the source, the row (0-based) and the field."""


def load_records(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a JSONL/JSON/Parquet/CSV file, a ``save_to_disk`` folder, a hub dataset id, or
    ``builtin:<name>`` (a dataset embedded in the package, e.g. ``builtin:default_prefs``)."""
    if str(source).startswith("builtin:"):
        return _read_jsonl(resolve_builtin(source))
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return _load_saved(path, split)
    if path.suffix in (".gz",) and path.with_suffix("").suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix in FILE_FORMATS:
        if not path.exists():
            raise DataError(f"{path}: file not found")
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        if path.suffix == ".json":
            return _read_json(path)
        import datasets

        return datasets.load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train").to_list()
    if path.suffix or path.exists() or str(source).startswith((".", "/", "~")):
        if not path.exists():
            raise DataError(f"{source}: file not found")
        raise DataError(f"{source}: unknown format {path.suffix!r}; use one of {sorted(FILE_FORMATS)} "
                        "(or .jsonl.gz), a saved `datasets` folder, or a hub dataset id")
    import datasets  # a hub id such as "trl-lib/ultrafeedback_binarized"

    return datasets.load_dataset(str(source), split=split).to_list()


def resolve_builtin(source: str | Path) -> Path:
    """The JSONL file of ``builtin:<name>``: a file embedded in the package, or ``builtin:shapes`` (generated
    vision pairs, ``shapes.py``: written once into the disk cache, images beside it)."""
    from importlib import resources

    name = str(source).split(":", 1)[1]
    if name == "shapes":
        from dpo_lightning.data import shapes

        return shapes.materialize()
    asset = resources.files("dpo_lightning.assets").joinpath(f"{name}.jsonl")
    if not asset.is_file():
        raise DataError(f"{source}: no such built-in dataset (available: builtin:default_prefs, builtin:shapes)")
    return Path(str(asset))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    rows: list[dict[str, Any]] = []
    with opener(path, "rt", encoding="utf-8-sig") as fh:  # -sig: a leading byte-order mark is not data
        for i, line in enumerate(fh):  # text mode: CRLF line ends read as LF
            if line.strip():
                rows.append(parse_jsonl_line(line, path, len(rows), i + 1))
    return rows


def parse_jsonl_line(line: str, path: Any, row: int, line_no: int) -> dict[str, Any]:
    """One JSONL row, or a ``DataError`` naming the file, row and line."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: row {row} (line {line_no}): invalid JSON: {err.msg}") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: row {row} (line {line_no}): expected a JSON object")
    return value


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of objects (or {{'data': [...]}})")
    return data


def _load_saved(path: Path, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(f"{path}: not a saved `datasets` folder ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: split {split!r} not found; available: {sorted(ds)}")
        ds = ds[split]
    return ds.to_list()


def is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def message_text(message: dict) -> str:
    """A message's text: its content, or the text of its parts (a multimodal content list)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")


def _is_content(content: Any) -> bool:
    """Text, or a list of {"type": "text", "text": str} / {"type": "image"} parts."""
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(p, dict) and (p.get("type") == "image" or (p.get("type") == "text" and isinstance(p.get("text"), str)))
        for p in content)


def _check_field(row: dict, field: str, where: str, i: int) -> None:
    if field not in row or row[field] is None:
        raise DataError(f"{where}: row {i}: missing field {field!r} (row has {sorted(row)})")
    value = row[field]
    if isinstance(value, str):
        return
    if isinstance(value, list) and value:
        for j, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and _is_content(m.get("content"))):
                raise DataError(f"{where}: row {i}: field {field!r}: message {j} must be "
                                "{'role': str, 'content': str} (or content parts {'type': 'text'|'image'})")
        return
    raise DataError(f"{where}: row {i}: field {field!r}: expected a string or a list of messages, "
                    f"got {type(value).__name__}")


def _common_prefix_length(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings (binary search on C-speed slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split an implicit-prompt pair into (prompt, chosen, rejected).

    Conversational: the prompt is the longest common prefix of messages (as TRL's ``extract_prompt``).
    Text: the prompt ends at the last assistant marker (``"\\n\\nAssistant:"``) inside the common prefix,
    so answers that happen to start with the same words keep them. Without a marker we fall back to TRL's
    rule (common character prefix, minus a trailing space). TRL 1.16 always uses the character rule, which
    moves shared opening words such as " I" into the prompt; with HH-RLHF that changes which tokens are scored.
    """
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    n = _common_prefix_length(chosen, rejected)
    common = chosen[:n]
    cut = max((common.rfind(m) + len(m) if m in common else -1) for m in ASSISTANT_MARKERS)
    if cut < 0:
        cut = n - 1 if n > 0 and n < len(chosen) and chosen[n - 1] == " " else n
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _mixed_prompt(prompt: Any, chosen: Any, rejected: Any, where: str, i: int) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) all text or all messages, when the prompt is one and the completions the other.

    * messages prompt, text completions: each completion becomes one assistant turn;
    * text prompt, completions that are whole conversations repeating it (``HuggingFaceH4/ultrafeedback_binarized``):
      the conversations' shared turns are the prompt;
    * text prompt, assistant-only completions: the prompt becomes one user turn.
    A text prompt that the conversations neither repeat nor can follow is refused (it would be dropped).
    """
    if is_messages(prompt) == is_messages(chosen):
        return prompt, chosen, rejected
    if is_messages(prompt):
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise DataError(f"{where}: row {i}: fields 'chosen' and 'rejected' must both be text or both messages")
        return prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    shared, c, r = extract_prompt(chosen, rejected)
    if shared:
        if any(m["role"] != "assistant" and message_text(m).strip() == prompt.strip() for m in shared):
            return shared, c, r
        raise DataError(f"{where}: row {i}: field 'prompt' is text that the conversations in 'chosen'/'rejected' "
                        "do not contain; give the prompt as messages, or leave it out to use the conversations' "
                        "shared turns")
    if all(m["role"] == "assistant" for m in chosen + rejected):
        return [{"role": "user", "content": prompt}], chosen, rejected
    raise DataError(f"{where}: row {i}: field 'prompt' is text but 'chosen'/'rejected' are conversations with "
                    "their own non-assistant turns and no shared prefix; give the prompt as messages")


def normalize(rows: list[dict[str, Any]], where: str, *, start: int = 0,
              unpaired: bool | None = None) -> list[dict[str, Any]]:
    """Check every row and return canonical records: paired (prompt/chosen/rejected) or unpaired
    (prompt/completion/label). Structural errors raise ``DataError``; mixing the two kinds does too.
    A chunk of a larger source passes its first row number (``start``) and the source's kind (``unpaired``,
    decided by the source's first row)."""
    if not rows:
        raise DataError(f"{where}: the dataset is empty")
    if unpaired is None:
        unpaired = "completion" in rows[0] and "label" in rows[0]
    out = []
    for i, row in enumerate(rows, start=start):
        if not isinstance(row, dict):
            raise DataError(f"{where}: row {i}: expected a mapping, got {type(row).__name__}")
        if unpaired:
            for f in ("prompt", "completion"):
                _check_field(row, f, where, i)
            label = row.get("label")
            if not isinstance(label, bool):
                raise DataError(f"{where}: row {i}: field 'label': expected true/false, got {label!r}")
            out.append(_with_images({"prompt": row["prompt"], "completion": row["completion"], "label": label}, row))
            continue
        for f in ("chosen", "rejected"):
            _check_field(row, f, where, i)
        if row.get("prompt") is not None:
            _check_field(row, "prompt", where, i)
            prompt, chosen, rejected = _mixed_prompt(row["prompt"], row["chosen"], row["rejected"], where, i)
        else:
            prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
        if isinstance(chosen, list) != isinstance(rejected, list):
            raise DataError(f"{where}: row {i}: fields 'chosen' and 'rejected' must both be text or both messages")
        out.append(_with_images({"prompt": prompt, "chosen": chosen, "rejected": rejected}, row))
    return out


def _with_images(rec: dict[str, Any], row: dict) -> dict[str, Any]:
    """``rec`` with the row's ``images`` (a vision row: an ``images`` or ``image`` column, possibly empty)."""
    from dpo_lightning.data.images import has_images, row_images

    if has_images(row):
        rec["images"] = row_images(row)
    return rec


def pairs_to_unpaired(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Split paired rows into KTO-style rows: (prompt, chosen, True) and (prompt, rejected, False)."""
    out = []
    for r in records:
        extra = {"images": r["images"]} if "images" in r else {}
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True, **extra})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False, **extra})
    return out
