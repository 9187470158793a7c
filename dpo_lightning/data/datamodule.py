"""``PreferenceDataModule``: files or hub datasets in, tokenized preference batches out.

    dm = PreferenceDataModule("pairs.jsonl", tokenizer="gpt2", val_fraction=0.1, batch_size=8)

Rows are normalized and checked (``formats.py``; every row against the policies of ``validate.py``, which
reports counts by reason), tokenized TRL's way and truncated (``tokenize.py``) in ``num_proc`` processes
(the checks run there too, on the same encoding), cached on disk as flat token arrays under a key of (data,
tokenizer, chat template, truncation settings, policies) and memory-mapped back (``cache.py``, ``store.py``:
``train_rows`` / ``val_rows`` are views over the maps, shared by the ranks of a node), then collated into
the batch contract of ``collate.py``. Dropped rows are counted by reason and reported once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from dpo_lightning.data.cache import tokenize_cached, tokenize_source, tokenizer_fingerprint
from dpo_lightning.data.collate import PreferenceCollator, UnpairedCollator
from dpo_lightning.data.formats import DataError
from dpo_lightning.data.from_module import adopt_loss_settings
from dpo_lightning.data.layouts import PACKED_UNSHARED, PLAIN, PREFIX_SHARED, check_layout
from dpo_lightning.data.sampler import LengthGroupedSampler, ResumableDataLoader
from dpo_lightning.data.split import held_out_mask
from dpo_lightning.data.store import TokenRows
from dpo_lightning.data.tokenize import TruncationConfig
from dpo_lightning.data.units import UnitCollator, UnitRows, unit_positions, units_per_batch
from dpo_lightning.data.validate import NO_KEEP, DataValidator
from dpo_lightning.models.vision import is_processor, text_tokenizer

__all__ = ["PreferenceDataModule", "tokenize_cached", "tokenizer_fingerprint"]


class PreferenceDataModule(L.LightningDataModule):
    """Tokenized preference pairs (or unpaired KTO rows) for any Lightning trainer.

    Args:
        path: JSONL/JSON/Parquet/CSV file, saved ``datasets`` folder, or hub dataset id.
        tokenizer: a tokenizer, or a hub id / path / ``ModelSpec`` to load it from; or a vision-language model's
            processor (rows with an ``images`` / ``image`` column are then tokenized with it, their images kept
            and given to the collator; ``tokenizer`` is then its text tokenizer, ``processor`` the processor).
        val_path: held-out data; otherwise ``val_fraction`` of the prompts of ``path`` is held out (seeded;
            every row of a held-out prompt, so no held-out prompt is trained on: ``split.py``).
        batch_size: pairs per device step (rows for unpaired data; split pairs and KTO rows travel in units
            of two rows, so an odd size rounds up, ``units.py``); ``eval_batch_size`` defaults to it.
        paired: False turns pairs into (prompt, completion, label) rows for unpaired losses (KTO);
            None: learned from the loss of the module this is trained with (``setup``), else the data's kind.
        kl_pairs: add TRL KTO's mismatched (prompt i, completion i-1) rows to unpaired batches; None: learned
            from the module's loss, like ``paired``.
        layout: how a batch's sequences are laid out for the model (``collate.py``): ``prefix_shared``
            (default: each prompt computed once for both completions), ``packed`` (the same, padding-free),
            ``packed_unshared`` (padding-free, for flash-attention varlen) or ``plain`` (TRL's layout).
            Every layout gives the same log-probs and gradients.
        group_by_length: batch rows of similar length together (seeded, a permutation of the data, rank-aware,
            resumable; ``sampler.py``). False: a plain seeded shuffle.
        num_proc: processes that check and tokenize a source on a cache miss (None: every core).
        validation: per-reason policies (``error`` / ``drop`` / ``keep``) of the row checks run before
            tokenization (``validate.py``, which lists the reasons and defaults; run in the tokenizing processes).
        report_path: where to write the validation report (``data_report.json``); None: not written.
        max_drop_fraction: the largest share of a source's rows that validation may drop (all reasons
            together); more stops before training with the counts by reason (1.0: never stop).
    """

    def __init__(self, path: str, tokenizer: Any, *, val_path: str | None = None, val_fraction: float = 0.0,
                 split: str = "train", val_split: str = "test", batch_size: int = 8,
                 eval_batch_size: int | None = None, max_length: int | None = 512,
                 max_prompt_length: int | None = None, truncation_mode: str = "keep_start",
                 paired: bool | None = None, kl_pairs: bool | None = None, num_proc: int | None = None,
                 num_workers: int = 0,
                 cache_dir: str | None = None, seed: int = 42, pad_to_multiple_of: int | None = None,
                 layout: str = PREFIX_SHARED, group_by_length: bool = True,
                 validation: dict[str, str] | None = None, report_path: str | None = None,
                 max_drop_fraction: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= max_drop_fraction <= 1.0:
            raise ValueError(f"data.max_drop_fraction={max_drop_fraction}: must be in [0, 1]")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size}: must be at least 1")
        self.path, self.val_path, self.val_fraction = path, val_path, val_fraction
        self.split, self.val_split = split, val_split
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.truncation = TruncationConfig(max_length, max_prompt_length, truncation_mode)
        self.paired, self.kl_pairs = paired, kl_pairs
        self.num_proc, self.num_workers, self.cache_dir, self.seed = num_proc, num_workers, cache_dir, seed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.layout, self.group_by_length = check_layout(layout), group_by_length
        self._tokenizer = self._tokenizer_source = tokenizer
        self._released = False  # the text tokenizer was dropped after tokenizing (release_tokenizer)
        self._pad_token_id: int | None = None
        self.validator, self.report_path = DataValidator(validation), report_path
        self.max_drop_fraction = max_drop_fraction
        self.train_rows: TokenRows | None = None
        self.from_pairs = False  # set when paired data was split into unpaired rows
        self.val_rows: TokenRows | list = []
        self.dropped: Counter = Counter()

    @property
    def tokenizer(self):
        """The text tokenizer (of the processor, when one was given): pad and EOS ids, the export."""
        return text_tokenizer(self._processing_class())

    @property
    def processor(self):
        """The processor given in place of a tokenizer (vision data), or None."""
        if self._released:  # only a text tokenizer is released (a processor makes every batch's pixels)
            return None
        p = self._processing_class()
        return p if is_processor(p) else None

    def _processing_class(self):
        from dpo_lightning.models.hf import ModelSpec, load_tokenizer

        if isinstance(self._tokenizer, (str, Path, ModelSpec)):
            spec = self._tokenizer if isinstance(self._tokenizer, ModelSpec) else ModelSpec(str(self._tokenizer))
            self._tokenizer = load_tokenizer(spec)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        if self._pad_token_id is None:
            self._pad_token_id = self.tokenizer.pad_token_id
        return self._pad_token_id

    def release_tokenizer(self) -> None:
        """Drop the loaded tokenizer once the rows are tokenized (a BPE tokenizer holds ~25-50 MB for the whole
        run otherwise); ``tokenizer`` loads it again when asked (the export). Kept when it was given as an
        object (it could not be reloaded)."""
        from dpo_lightning.models.hf import ModelSpec

        if self.train_rows is not None and isinstance(self._tokenizer_source, (str, Path, ModelSpec)) and \
                not is_processor(self._processing_class()):
            self._pad_token_id = self.pad_token_id
            self._tokenizer, self._released = self._tokenizer_source, True

    def _tokenize(self, source: str, split: str) -> TokenRows:
        rows, dropped, split_pairs = tokenize_source(source, split, self._processing_class(), self.truncation,
                                                     paired=self.paired, validator=self.validator,
                                                     num_proc=self.num_proc, cache_dir=self.cache_dir)
        self.from_pairs = self.from_pairs or split_pairs
        self.dropped.update(dropped)
        self._check_dropped(str(source))
        if not len(rows):
            raise DataError(f"{source}: no rows left after tokenization and truncation (dropped: {dict(dropped)}); "
                            "raise data.max_length or lower data.max_prompt_length")
        return rows

    def _check_dropped(self, where: str) -> None:
        """Stop (``DataError``) when validation dropped more than ``max_drop_fraction`` of the source's rows."""
        rep = self.validator.report["sources"].get(where) or {}
        rows, dropped = rep.get("rows", 0), rep.get("dropped", 0)
        if not rows or dropped <= self.max_drop_fraction * rows:
            return
        if self.report_path:
            self.validator.write_report(self.report_path)
        reasons = {r: v["count"] for r, v in rep["by_reason"].items() if v["policy"] == "drop"}
        counts = ", ".join(f"{r} {c}" for r, c in sorted(reasons.items(), key=lambda x: -x[1]))
        fixes = []
        if reasons.keys() & {"prompt_fills_max_length", "empty_after_truncation"}:
            fixes.append(f"raise data.max_length (now {self.truncation.max_length})"
                         + (f" or data.max_prompt_length (now {self.truncation.max_prompt_length})"
                            if self.truncation.max_prompt_length else ""))
        keepable = sorted(r for r in reasons if r not in NO_KEEP)
        if keepable:
            fixes.append("keep such rows with " + " ".join(f"data.validation.{r}=keep" for r in keepable))
        fixes.append(f"or train on the {rows - dropped} rows left with data.max_drop_fraction="
                     f"{min(1.0, -(-100 * dropped // rows) / 100):g}")
        raise DataError(f"{where}: validation dropped {dropped} of {rows} rows ({dropped / rows:.0%}), more than "
                        f"data.max_drop_fraction={self.max_drop_fraction:g}: {counts}; "
                        + "; ".join(fixes) + (f" (details: {self.report_path})" if self.report_path else ""))

    def setup(self, stage: str | None = None) -> None:
        if adopt_loss_settings(self, getattr(self.trainer, "lightning_module", None) if self.trainer else None):
            self.train_rows, self.val_rows, self.dropped, self.from_pairs = None, [], Counter(), False
        if self.train_rows is not None:
            return
        rows = self._tokenize(self.path, self.split)
        if self.val_path:
            self.train_rows = rows
            self.val_rows = self._tokenize(self.val_path, self.val_split)
        elif self.val_fraction > 0:
            # hold out whole prompts (split.py): no held-out prompt is seen in training, on any rank
            held = held_out_mask(rows, val_fraction=self.val_fraction, seed=self.seed, from_pairs=self.from_pairs,
                                 where=str(self.path))
            self.val_rows = rows.take(np.flatnonzero(held))  # views in row order: no row is copied
            self.train_rows = rows.take(np.flatnonzero(~held))
        else:
            self.train_rows = rows
        if self.dropped:
            print(f"[dpo_lightning] dropped rows by reason: {dict(self.dropped)}")
        print(f"[dpo_lightning] data report: {self.validator.summary()}")
        if self.report_path:
            self.validator.write_report(self.report_path)

    def collator(self, layout: str | None = None) -> PreferenceCollator | UnpairedCollator:
        pad = self.pad_token_id
        layout = layout or self.layout
        processor = self.processor  # None for a tokenizer; rows without images collate as text either way
        if self.train_rows and "completion_ids" in self.train_rows[0]:
            return UnpairedCollator(pad, self.pad_to_multiple_of, kl_pairs=bool(self.kl_pairs), layout=layout,
                                    from_pairs=self.from_pairs, processor=processor)
        return PreferenceCollator(pad, self.pad_to_multiple_of, layout=layout, processor=processor)

    def row_lengths(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Tokens each row puts through the model in this layout (the sampler's grouping key)."""
        if isinstance(rows, TokenRows):  # from the length arrays, without building rows
            p, a = rows.lengths("prompt"), rows.lengths("a")
            comps = [a, rows.lengths("b")] if rows.paired else [a] * (2 if self.kl_pairs else 1)
            if self.layout == PLAIN:
                return (p + np.max(comps, axis=0)).tolist()
            if self.layout == PACKED_UNSHARED:
                return sum(p + c for c in comps).tolist()
            return (p + sum(comps)).tolist()

        def length(r):
            p = len(r["prompt_ids"])
            comps = ([r["chosen_ids"], r["rejected_ids"]] if "chosen_ids" in r else [r["completion_ids"]] * (
                2 if self.kl_pairs else 1))
            if self.layout == PLAIN:
                return p + max(len(c) for c in comps)
            if self.layout == PACKED_UNSHARED:
                return sum(p + len(c) for c in comps)
            return p + sum(len(c) for c in comps)
        return [length(r) for r in rows]

    def _loader(self, rows, batch_size: int, shuffle: bool) -> DataLoader:
        # a split pair's rows, and KTO's rows two by two, travel as one unit (same rank, same batch; units.py)
        index = rows.index if isinstance(rows, TokenRows) else [r["index"] for r in rows]
        units = unit_positions(index, from_pairs=self.from_pairs, kl_pairs=bool(self.kl_pairs))
        items, collate = (rows, self.collator()) if units is None else (
            UnitRows(rows, units), UnitCollator(self.collator()))
        if units is not None:
            batch_size = units_per_batch(batch_size)
        if not shuffle:  # Lightning gives each rank its share of ``items`` (DistributedSampler) under DDP
            return DataLoader(items, batch_size=batch_size, shuffle=False, collate_fn=collate,  # type: ignore[arg-type]
                              num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        lengths = self.row_lengths(rows)
        if units is not None:
            lengths = [sum(lengths[p] for p in u) for u in units]
        sampler = LengthGroupedSampler(lengths, batch_size, seed=self.seed, group_by_length=self.group_by_length)
        return ResumableDataLoader(items, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_rows, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:  # [] when there is no validation split
        return self._loader(self.val_rows, self.eval_batch_size, shuffle=False) if self.val_rows else []

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.val_dataloader()
