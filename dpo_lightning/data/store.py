"""Tokenized rows as flat arrays on disk, memory-mapped: the storage behind the tokenization cache.

One cache entry is a folder of ``.npy`` files (no pickle; read with ``allow_pickle=False``)::

    index.npy          int64 [N]     row number in the source (after a pair split, 2i / 2i+1 for source row i)
    prompt.npy         int32 [T_p]   every kept row's prompt ids, concatenated
    prompt_off.npy     int64 [N+1]   row i's prompt is prompt[prompt_off[i]:prompt_off[i+1]]
    a.npy, a_off.npy                 chosen ids (pairs) or completion ids (unpaired rows), likewise
    b.npy, b_off.npy                 rejected ids (pairs; empty for unpaired rows)
    label.npy          bool  [N]     unpaired rows' labels (all False for pairs)
    meta.json                        {"version", "paired", "from_pairs", "rows", "tokens", "dropped",
                                      "report"[, "vision"]}: "report" is the source's validation report
                                      (``validate.py``)

A vision entry (``meta["vision"]``; text entries have exactly the files above) also keeps each row's images as
their encoded bytes (``images.py``), memory-mapped like the ids::

    images.npy         uint8 [T_i]   every kept row's images' bytes, concatenated
    images_off.npy     int64 [M+1]   image j is images[images_off[j]:images_off[j+1]]
    images_row.npy     int64 [N+1]   row i's images are images images_row[i] .. images_row[i+1]-1

``StoreWriter`` appends chunks as they come back from the tokenizing processes (memory stays flat: a chunk
at a time) and publishes the folder atomically (temp folder, rename). ``load_store`` maps the arrays
read-only: the ranks of a node share their pages instead of each holding a copy, and a hit costs no parsing.

``TokenRows`` is the list of row dicts the collators and samplers index (``rows[i]`` is
``{"index", "prompt_ids", "chosen_ids", "rejected_ids"}`` or ``{"index", "prompt_ids", "completion_ids",
"label"}``, with ``"images": list[bytes]`` for a vision entry, plus any per-row columns set later, e.g. cached reference log-probs), built on access from the
maps; slicing and ``take`` give views, and the lengths come out as arrays without building any row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpo_lightning.files.atomic import writing
from dpo_lightning.files.disk_cache import publish_folder, staging_folder

FIELDS = ("prompt", "a", "b")
IMAGE_ARRAYS = ("images", "images_off", "images_row")


class StoreWriter:
    """Write one cache entry chunk by chunk into a temp folder beside ``final``; ``publish`` renames it."""

    def __init__(self, final: Path, vision: bool = False):
        self.final, self.vision = final, vision
        self.tmp = staging_folder(final)
        self._raw: dict[str, Any] = {}
        self._img_count: list[np.ndarray] = []
        self._img_len: list[np.ndarray] = []
        try:
            with writing(final):
                self._raw = {f: open(self.tmp / f"{f}.raw", "wb") for f in FIELDS + (("images",) if vision else ())}
        except BaseException:
            self.abort()
            raise
        self._lens: dict[str, list[np.ndarray]] = {f: [] for f in FIELDS}
        self._index: list[np.ndarray] = []
        self._label: list[np.ndarray] = []
        self.dropped: Counter = Counter()

    def add(self, chunk: dict[str, Any]) -> None:
        """A chunk: ``index``, ``label``, ``{field}_len`` (per row) and ``{field}`` (flat int32 ids) arrays."""
        self._index.append(chunk["index"])
        self._label.append(chunk["label"])
        for f in FIELDS:
            self._lens[f].append(chunk[f"{f}_len"])
            with writing(self.final):  # a full disk: WriteError naming the entry (the caller aborts)
                chunk[f].astype("<i4", copy=False).tofile(self._raw[f])
        if self.vision:  # ``img_count`` per row, ``img_len`` per image, ``img`` the bytes (uint8)
            self._img_count.append(chunk["img_count"])
            self._img_len.append(chunk["img_len"])
            with writing(self.final):
                chunk["img"].astype(np.uint8, copy=False).tofile(self._raw["images"])
        self.dropped.update(chunk["dropped"])

    def publish(self, *, paired: bool, from_pairs: bool, report: dict | None = None) -> Path:
        """Finish the arrays and ``meta.json`` (with the validation ``report``) in the temp folder and rename it
        to the entry. ``meta.json`` is written last and the rename is atomic: an entry folder is complete or
        absent. A failed write (``WriteError`` naming the entry) removes the temp folder."""
        try:
            with writing(self.final):
                self._finish(paired=paired, from_pairs=from_pairs, report=report)
        finally:
            self.abort()
        return self.final

    def _finish(self, *, paired: bool, from_pairs: bool, report: dict | None) -> None:
        n = int(sum(len(x) for x in self._index))
        _save(self.tmp / "index.npy", np.concatenate(self._index or [np.zeros(0)]).astype(np.int64))
        _save(self.tmp / "label.npy", np.concatenate(self._label or [np.zeros(0)]).astype(bool))
        tokens = 0
        for f in FIELDS:
            self._raw[f].close()
            lens = np.concatenate(self._lens[f] or [np.zeros(0)]).astype(np.int64)
            off = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lens, out=off[1:])
            _save(self.tmp / f"{f}_off.npy", off)
            tokens += int(off[-1])
            _raw_to_npy(self.tmp / f"{f}.raw", self.tmp / f"{f}.npy", int(off[-1]))
        meta = {"version": 1, "paired": paired, "from_pairs": from_pairs, "rows": n, "tokens": tokens,
                "dropped": dict(self.dropped), "report": report}
        if self.vision:
            self._raw["images"].close()
            for name, parts in (("images_row", self._img_count), ("images_off", self._img_len)):
                lens = np.concatenate(parts or [np.zeros(0)]).astype(np.int64)
                off = np.zeros(len(lens) + 1, dtype=np.int64)
                np.cumsum(lens, out=off[1:])
                _save(self.tmp / f"{name}.npy", off)
                if name == "images_off":
                    _raw_to_npy(self.tmp / "images.raw", self.tmp / "images.npy", int(off[-1]), "|u1")
            meta["vision"] = True
        (self.tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True))
        # atomic; a finished entry is never half-written. Another process that published the same key
        # first wrote the same content: keep theirs
        publish_folder(self.tmp, self.final, complete=lambda entry: (entry / "meta.json").exists())

    def abort(self) -> None:
        for fh in self._raw.values():
            with contextlib.suppress(OSError):  # flushing onto a full disk fails again: the folder goes anyway
                fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _save(path: Path, array: np.ndarray) -> None:
    np.save(path, array, allow_pickle=False)


def _raw_to_npy(raw: Path, npy: Path, count: int, descr: str = "<i4") -> None:
    """Prefix the raw stream (int32 ids, or image bytes) with an ``.npy`` header (streamed: no copy in memory)."""
    with open(npy, "wb") as out:
        np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": (count,)})
        with open(raw, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 22)
    raw.unlink()


def load_store(folder: Path) -> dict[str, Any] | None:
    """The entry's arrays (memory-mapped) and meta, or None when the folder is not a complete entry (no
    ``meta.json``, written last; an array missing, cut short or of another length than ``meta.json`` says)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        names = ["index", "label", *FIELDS, *(f"{f}_off" for f in FIELDS)]
        names += list(IMAGE_ARRAYS) if meta.get("vision") else []
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in names}
    except (OSError, ValueError):
        return None
    rows = meta.get("rows")
    if meta.get("vision") and (len(arrays["images_row"]) != rows + 1 or int(arrays["images_row"][-1]) + 1 != len(
            arrays["images_off"]) or int(arrays["images_off"][-1]) != len(arrays["images"])):
        return None
    if any(len(arrays[a]) != rows for a in ("index", "label")):
        return None
    for f in FIELDS:  # a cut-short ids file is not an entry (np.load checks its header's length; this the offsets')
        off = arrays[f"{f}_off"]
        if len(off) != rows + 1 or int(off[-1]) != len(arrays[f]):
            return None
    return {"meta": meta, "arrays": arrays, "folder": str(folder)}


class TokenRows(Sequence):
    """A sequence of row dicts over a store (see the module docstring); ``positions`` select its rows."""

    def __init__(self, store: dict[str, Any], positions: np.ndarray | None = None,
                 columns: dict[str, np.ndarray] | None = None):
        self._store = store
        n = len(store["arrays"]["index"])
        self._pos = np.arange(n, dtype=np.int64) if positions is None else np.asarray(positions, dtype=np.int64)
        self._columns = dict(columns or {})
        self.paired = bool(store["meta"]["paired"])
        self.vision = bool(store["meta"].get("vision"))

    # --- the list interface the collators, samplers and loaders use
    def __len__(self) -> int:
        return len(self._pos)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range ({len(self)} rows)")
        a, p = self._store["arrays"], int(self._pos[i])

        def ids(f):
            off = a[f"{f}_off"]
            return a[f][off[p]:off[p + 1]].tolist()

        row: dict[str, Any] = {"index": int(a["index"][p]), "prompt_ids": ids("prompt")}
        if self.paired:
            row["chosen_ids"], row["rejected_ids"] = ids("a"), ids("b")
        else:
            row["completion_ids"], row["label"] = ids("a"), bool(a["label"][p])
        if self.vision:
            row["images"] = self.images_of(p)
        for k, col in self._columns.items():
            row[k] = col[i].item()
        return row

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(x == y for x, y in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # mutable (columns), like a list

    def __add__(self, other) -> list[dict[str, Any]]:
        return list(self) + list(other)

    def __repr__(self) -> str:
        return f"TokenRows({len(self)} rows, {'paired' if self.paired else 'unpaired'}, {self._store['folder']})"

    # --- views and columns without building rows
    def take(self, positions) -> TokenRows:
        positions = np.asarray(positions, dtype=np.int64)
        return TokenRows(self._store, self._pos[positions], {k: v[positions] for k, v in self._columns.items()})

    @property
    def folder(self) -> Path:
        """The cache entry the rows are mapped from."""
        return Path(self._store["folder"])

    @property
    def index(self) -> np.ndarray:  # type: ignore[override]  # the rows' record index, not Sequence.index
        return np.asarray(self._store["arrays"]["index"][self._pos])

    def lengths(self, field: str) -> np.ndarray:
        """Per-row token counts of ``prompt``, ``a`` (chosen / completion) or ``b`` (rejected)."""
        off = self._store["arrays"][f"{field}_off"]
        return np.asarray(off[self._pos + 1] - off[self._pos])

    def images_of(self, p: int) -> list[bytes]:
        """The images (encoded bytes) of store row ``p`` (a vision entry)."""
        a = self._store["arrays"]
        row, off = a["images_row"], a["images_off"]
        return [bytes(a["images"][off[j]:off[j + 1]]) for j in range(int(row[p]), int(row[p + 1]))]

    def prompt_bytes(self):
        """Each row's prompt ids as bytes (little-endian int32), in row order: a key for grouping by prompt
        (a vision row's key also holds its images' bytes: the same text about another image is another prompt)."""
        a = self._store["arrays"]
        prompt, off = a["prompt"], a["prompt_off"]
        for p in self._pos.tolist():
            key = np.asarray(prompt[off[p]:off[p + 1]], dtype="<i4").tobytes()
            if self.vision:
                key += b"".join(hashlib.sha256(b).digest() for b in self.images_of(p))
            yield key

    def set_column(self, name: str, values) -> None:
        """A per-row value (e.g. a cached reference log-prob) that every row dict then carries."""
        values = np.asarray(values)
        if len(values) != len(self):
            raise ValueError(f"column {name!r}: {len(values)} values for {len(self)} rows")
        self._columns[name] = values

    # --- pickled by folder (DataLoader workers under spawn, DDP): the arrays are mapped again, not copied
    def __getstate__(self):
        return {"folder": self._store["folder"], "pos": self._pos, "columns": self._columns}

    def __setstate__(self, state):
        store = load_store(Path(state["folder"]))
        if store is None:
            raise FileNotFoundError(f"{state['folder']}: tokenization cache entry missing")
        self.__init__(store, state["pos"], state["columns"])  # type: ignore[misc]  # unpickling
