"""Data: formats, tokenization, collation and the Lightning data module."""

from dpo_lightning.data.collate import PreferenceCollator, UnpairedCollator
from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.data.formats import DataError, extract_prompt, load_records, normalize
from dpo_lightning.data.tokenize import TruncationConfig, tokenize_records

__all__ = ["DataError", "PreferenceCollator", "PreferenceDataModule", "TruncationConfig", "UnpairedCollator",
           "extract_prompt", "load_records", "normalize", "tokenize_records"]
