"""Shared fixtures: an isolated cache, the built-in tiny model, and the optional real data in ../shared/data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Every test (and every subprocess a test starts) builds caches in a throwaway folder, never in ~/.cache.
os.environ.setdefault("DPO_LIGHTNING_CACHE", tempfile.mkdtemp(prefix="dpo-lightning-test-cache-"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    """The built-in tiny Llama + tokenizer, saved with save_pretrained (built once per session)."""
    from dpo_lightning.models.tiny import materialize

    return materialize()


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from dpo_lightning.models.hf import ModelSpec, load_tokenizer

    return load_tokenizer(ModelSpec(str(tiny_path)))


@pytest.fixture(scope="session")
def default_data_path() -> str:
    from importlib import resources

    return str(resources.files("dpo_lightning.assets").joinpath("default_prefs.jsonl"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real GPT-2 tokenizer, HH-RLHF pairs); tests using it skip where it is absent."""
    if not (SHARED_DATA / "gpt2-tokenizer" / "tokenizer.json").exists():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models run faster so, and no oversubscription beside other jobs)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
