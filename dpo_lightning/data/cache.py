"""The tokenization cache: sources tokenized in worker processes, chunk by chunk, into flat arrays on disk.

    rows, dropped, from_pairs = tokenize_source("pairs.jsonl", "train", tokenizer, TruncationConfig(512))

A cache entry (``store.py``) is keyed by the source's bytes (a local file or folder; a hub dataset by its
rows), the split, the pair/unpaired choice, the tokenizer, the truncation settings and the validation
policies, so a hit reads neither the source nor ``datasets``: it hashes the file, maps the arrays and
restores the validation report stored with them. A miss streams the source (JSONL line by line; other
formats row lists) in chunks to ``num_proc`` processes (default: every core), which parse, check and
tokenize them (``checks.py`` on one encoding per row; ``formats.py``, ``tokenize.py``: TRL's semantics,
unchanged); the parent merges each chunk's check results in row order (``DataValidator.absorb``: counts,
the first error, duplicates across chunks) and appends its arrays to the entry as it comes back, so memory
stays flat whatever the size, and a progress bar shows rows/s.

A vision source (a processor, ``models.vision.is_processor``, and an ``images`` / ``image`` column) is read whole in
the parent, each image as its bytes (``images.resolve_rows``), and keyed by its rows with every image as the
sha256 of its bytes, never its path (the same image elsewhere hits, a rewritten one misses); its entry keeps
the images' bytes (``store.py``). A processor with a text-only source tokenizes it with its tokenizer as text. Concurrent misses (the ranks of a node) take the
entry's file lock (``files/disk_cache.py``): one tokenizes, the others wait and hit.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import os
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dpo_lightning.data.cache_keys import (
    cache_key,
    cache_root,
    default_num_proc,
    records_fingerprint,
    source_fingerprint,
    tokenizer_fingerprint,
)
from dpo_lightning.data.checks import ChunkContext, check_chunk
from dpo_lightning.data.formats import DataError, load_records, parse_jsonl_line, resolve_builtin
from dpo_lightning.data.images import (
    base_folder,
    has_images,
    image_token_ids,
    resolve_rows,
)
from dpo_lightning.data.store import StoreWriter, TokenRows, load_store
from dpo_lightning.data.tokenize import TruncationConfig, split_prompt, tokenize_records, truncate
from dpo_lightning.data.validate import VISION_REASONS, DataValidator, first_kind, is_unpaired_file
from dpo_lightning.files.atomic import remove_path
from dpo_lightning.files.disk_cache import file_lock
from dpo_lightning.models.vision import is_processor, text_tokenizer

CHUNK_ROWS = 512  # rows per task sent to a worker


# ------------------------------------------------------------------ work done in the worker processes
_STATE: dict[str, Any] = {}


def _init(state: dict[str, Any]) -> None:
    _STATE.clear()
    _STATE.update(state)


def _flat(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    return lens, np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(lens.sum()))


def _arrays(rows: list[tuple], paired: bool) -> dict[str, Any]:
    """Rows as (index, prompt ids, a ids, b ids, label[, images]) into the flat arrays of a chunk; a vision
    source's chunk also holds its rows' images (``img_count`` per row, ``img_len`` per image, ``img`` bytes)."""
    out: dict[str, Any] = {"index": np.array([r[0] for r in rows], dtype=np.int64),
                           "label": np.array([r[4] for r in rows], dtype=bool)}
    for k, f in enumerate(("prompt", "a", "b"), start=1):
        out[f"{f}_len"], out[f] = _flat([r[k] for r in rows])
    out["pair"] = out["index"] // 2 if _STATE.get("split_pairs") else out["index"]
    if _STATE.get("vision"):
        images = [list(r[5]) if len(r) > 5 else [] for r in rows]
        out["img_count"] = np.array([len(x) for x in images], dtype=np.int64)
        flat = [b for x in images for b in x]
        out["img_len"] = np.array([len(b) for b in flat], dtype=np.int64)
        out["img"] = np.frombuffer(b"".join(flat), dtype=np.uint8)
    return out


def _work(task: tuple[str, int, list]) -> dict[str, Any]:
    """Check and tokenize one chunk (``checks.py``: one encoding per row); return its rows as flat arrays
    and its check results, which the parent merges in row order."""
    kind, start, payload = task
    s = _STATE
    if s["ctx"] is None:  # records already normalized and checked (``tokenize_cached``)
        recs, dropped = tokenize_records(payload, s["tokenizer"], s["cfg"])
        out = _arrays([(r["index"] + start, r["prompt_ids"], r.get("chosen_ids", r.get("completion_ids")),
                        r.get("rejected_ids", []), bool(r.get("label", False))) for r in recs], s["paired"])
        return {**out, "n": len(payload), "dropped": dict(dropped), "check": None}
    check = check_chunk(payload, start, s["ctx"], lines=kind == "jsonl")
    rows: list[tuple] = []
    dropped = Counter()
    for i, rec, ((prompt_full, full), (p, cs)) in check.kept:
        images = rec.get("images") or []
        if not s["split_pairs"]:
            rows.append((i, p, cs[0], cs[1] if len(cs) == 2 else [], bool(rec.get("label", False)), images))
            continue
        for k in (0, 1):  # rows 2i, 2i+1: pair i's chosen (label True) and rejected, each truncated alone
            pk, ck = truncate(*split_prompt(prompt_full, [full[k]]), s["cfg"], s["ctx"].image_ids)
            if pk is None:
                dropped[ck] += 1
            else:
                rows.append((2 * i + k, pk, ck[0], [], k == 0, images))
    check.kept = []  # the ids travel as arrays
    return {**_arrays(rows, s["paired"]), "n": len(payload), "dropped": dict(dropped), "check": check}


def _without(out: dict[str, Any], gone: set[int]) -> dict[str, Any]:
    """A chunk without the rows of source rows ``gone`` (duplicates dropped across chunks)."""
    keep = ~np.isin(out["pair"], np.fromiter(gone, dtype=np.int64))
    new = {**out, "index": out["index"][keep], "label": out["label"][keep], "pair": out["pair"][keep]}
    for f in ("prompt", "a", "b"):
        new[f] = out[f][np.repeat(keep, out[f"{f}_len"])]
        new[f"{f}_len"] = out[f"{f}_len"][keep]
    if "img" in out:
        per_image = np.repeat(keep, out["img_count"])
        new["img"] = out["img"][np.repeat(per_image, out["img_len"])]
        new["img_len"], new["img_count"] = out["img_len"][per_image], out["img_count"][keep]
    return new


# ------------------------------------------------------------------ the parent: tasks in, arrays out
def _jsonl_tasks(path: Path, rows: int | None = None) -> Iterator[tuple[str, int, list]]:
    rows = rows or CHUNK_ROWS
    opener = gzip.open if path.suffix == ".gz" else open
    chunk, start = [], 0
    with opener(path, "rt", encoding="utf-8-sig") as fh:  # a byte-order mark (Windows tools) is not data
        for n, line in enumerate(fh, start=1):
            if line.strip():
                chunk.append((n, line))
                if len(chunk) == rows:
                    yield "jsonl", start, chunk
                    start, chunk = start + len(chunk), []
    if chunk:
        yield "jsonl", start, chunk


def _list_tasks(records: list, rows: int | None = None) -> Iterator[tuple[str, int, list]]:
    rows = rows or CHUNK_ROWS
    for start in range(0, len(records), rows):
        yield "rows", start, records[start:start + rows]


@contextlib.contextmanager
def _progress(total: int | None, desc: str, enabled: bool):
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("[progress.data.speed]{task.fields[rate]}"), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(desc, total=total, rate="")

        def advance(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:,.0f} rows/s" if speed else "")
        yield advance


def _count_rows(path: Path) -> int | None:
    if path.suffix == ".gz":
        return None
    with open(path, "rb") as fh:
        return sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 24), b""))


def _build(folder: Path, tasks: Iterator, total: int | None, state: dict[str, Any], num_proc: int,
           progress: bool, desc: str, validator: DataValidator | None = None) -> None:
    """Run ``tasks`` through the workers (in order, a bounded number in flight) into a new entry; with a
    ``validator``, each chunk's check results are merged in row order and the report is stored with it."""
    writer = StoreWriter(folder, vision=bool(state.get("vision")))
    seen = [0]
    try:
        with _progress(total, desc, progress) as advance:
            def take(out):
                if out["check"] is not None:
                    assert validator is not None  # chunks carry check results only for a validator's build
                    gone = validator.absorb(out["check"])
                    out = _without(out, gone) if gone else out
                writer.add(out)
                seen[0] += out["n"]
                advance(out["n"])
            procs = min(num_proc, -(-total // CHUNK_ROWS)) if total else num_proc
            if procs <= 1:
                _init(state)
                try:
                    for t in tasks:
                        take(_work(t))
                finally:
                    _STATE.clear()
            else:
                _parallel(tasks, state, procs, take)
        report = validator.finish(state["where"], seen[0]) if validator is not None else None
        writer.publish(paired=state["paired"], from_pairs=state["split_pairs"], report=report)
    finally:
        writer.abort()


def _parallel(tasks: Iterator, state: dict[str, Any], procs: int, take) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism (and fork-safe so)
    try:
        with ctx.Pool(procs, initializer=_init, initargs=(state,)) as pool:
            pending: deque = deque()
            for t in tasks:
                pending.append(pool.apply_async(_work, (t,)))
                if len(pending) >= 2 * procs:  # bounded: the source is never read far ahead of the workers
                    take(pending.popleft().get())
            while pending:
                take(pending.popleft().get())
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _cached(key: str, cache_dir, make) -> tuple[TokenRows, dict[str, Any]]:
    folder = cache_root(cache_dir) / key
    store = load_store(folder)
    if store is None:
        with file_lock(folder):  # <key>.lock beside the entry
            store = load_store(folder)  # another process may have built it while we waited
            if store is None:
                remove_path(folder)  # a damaged entry (a file cut short by hand): never read, built anew
                make(folder)
                store = load_store(folder)
    if store is None:
        raise OSError(f"{folder}: the tokenization cache entry could not be read back")
    return TokenRows(store), store["meta"]


def tokenize_cached(records: list[dict], tokenizer, cfg: TruncationConfig, *, num_proc: int | None = None,
                    cache_dir: str | Path | None = None, progress: bool = True) -> tuple[TokenRows, Counter]:
    """Tokenize normalized (already checked) records, in ``num_proc`` processes (None: every core), through
    the cache; returns (rows, dropped rows by reason)."""
    paired = "chosen" in records[0]
    key = cache_key("records", records_fingerprint(records), tokenizer_fingerprint(tokenizer), cfg.__dict__)
    state = {"tokenizer": tokenizer, "cfg": cfg, "where": "records", "ctx": None, "split_pairs": False,
             "paired": paired}

    def make(folder):
        _build(folder, _list_tasks(records), len(records), state, num_proc or default_num_proc(), progress,
               "Tokenizing")
    rows, meta = _cached(key, cache_dir, make)
    return rows, Counter(meta["dropped"])


def _head(tasks: Iterator, where: str) -> tuple[bool, bool | None, Iterator]:
    """(whether the source is an unpaired file, the kind of its first readable row, all the tasks): reads
    only as many chunks as it takes to find a readable row."""
    buffered: list = []
    unpaired = None
    for task in tasks:
        buffered.append(task)
        for j, row in enumerate(task[2]):
            if task[0] == "jsonl":
                try:
                    row = parse_jsonl_line(row[1], where, task[1] + j, row[0])
                except DataError:
                    row = None
            unpaired = is_unpaired_file(row) if unpaired is None else unpaired
            kind = first_kind([row], where, unpaired) if row is not None else None
            if kind is not None:
                return unpaired, kind, itertools.chain(buffered, tasks)
    return bool(unpaired), None, iter(buffered)


def tokenize_source(source: str, split: str, tokenizer, cfg: TruncationConfig, *, paired: bool | None = None,
                    validator: DataValidator | None = None, num_proc: int | None = None,
                    cache_dir: str | Path | None = None, progress: bool = True) -> tuple[TokenRows, Counter, bool]:
    """Read, check (``validator``'s policies; default: the defaults), tokenize and cache a source (see the
    module docstring); the validation report of the source lands in ``validator.report``, also on a hit.

    ``paired``: True requires pairs, False splits pairs into (prompt, completion, label) rows (rows 2i, 2i+1),
    None keeps the data's kind. Returns (rows, rows dropped by truncation after a split, by reason, whether
    pairs were split).
    """
    validator = validator or DataValidator()
    vision = False
    records: list[dict[str, Any]] | None
    fingerprint: str | None
    if is_processor(tokenizer):  # vision rows when the source has an image column, else text with its tokenizer
        records = load_records(source, split)
        vision = any(has_images(r) for r in records)
        if vision:
            folder = base_folder(resolve_builtin(source) if str(source).startswith("builtin:") else source)
            records = resolve_rows(records, folder)  # images as bytes: the key hashes them
            fingerprint = "vision:" + records_fingerprint(records)
        else:
            tokenizer = text_tokenizer(tokenizer)
            fingerprint = source_fingerprint(source) or "rows:" + records_fingerprint(records)
            if not fingerprint.startswith("rows:"):
                records = None
    else:
        fingerprint = source_fingerprint(source)
        records = load_records(source, split) if fingerprint is None else None
        if records is not None:
            fingerprint = "rows:" + records_fingerprint(records)
    policies = validator.policies if vision else {k: v for k, v in validator.policies.items()
                                                  if k not in VISION_REASONS}  # text keys as before
    key = cache_key("source", fingerprint, split, paired, tokenizer_fingerprint(tokenizer), cfg.__dict__,
                    policies)
    where = str(source)
    path = Path(where).expanduser()

    def make(folder):
        stream = records is None and path.is_file() and path.name.endswith((".jsonl", ".jsonl.gz"))
        raw = [] if stream else (records if records is not None else load_records(source, split))
        if not stream and not raw:
            raise DataError(f"{where}: the dataset is empty")
        unpaired, kind, tasks = _head(_jsonl_tasks(path) if stream else _list_tasks(raw), where)
        if kind is None:  # no readable row: the checks drop or refuse every row (unless there is none)
            listed = list(tasks)
            if not listed:
                raise DataError(f"{where}: the dataset is empty")
            tasks = iter(listed)
        if paired is True and kind is False:
            raise DataError(f"{source}: the loss needs paired rows (prompt/chosen/rejected); this file has "
                            "unpaired rows (prompt/completion/label)")
        ctx = ChunkContext(where, validator.policies, tokenizer, cfg, unpaired, kind, vision=vision,
                           image_ids=image_token_ids(tokenizer) if vision else frozenset())
        state = {"tokenizer": tokenizer, "cfg": cfg, "where": where, "ctx": ctx, "vision": vision,
                 "split_pairs": paired is False and bool(kind), "paired": bool(kind) and paired is not False}
        total = _count_rows(path) if stream else len(raw)
        validator.begin(where)
        _build(folder, tasks, total, state, num_proc or default_num_proc(), progress,
               f"Tokenizing {path.name if stream else where}", validator)
    rows, meta = _cached(key, cache_dir, make)
    validator.report["sources"][where] = meta["report"]
    return rows, Counter(meta["dropped"]), bool(meta["from_pairs"])
