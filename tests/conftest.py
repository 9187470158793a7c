"""Shared fixtures: an isolated cache, the built-in tiny model, and the optional real data in ../shared/data; and
the check that keeps the tiers honest: a test that starts a subprocess must be marked ``subprocess``, one that
starts several training processes ``distributed`` (plain helpers are in helpers.py)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

# Every test (and every subprocess a test starts) builds caches in a throwaway folder, never in ~/.cache.
os.environ.setdefault("DPO_LIGHTNING_CACHE", tempfile.mkdtemp(prefix="dpo-lightning-test-cache-"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test -n 2: the workers share the cores, one torch thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

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


# ------------------------------------------------------------------ tiers: markers checked where they matter
_PROGRAMS = re.compile(r"(pip[0-9.]*|dpo-(train|eval|sweep-report)|torchrun|srun)$")
_MANY = re.compile(r"^trainer\.devices=([2-9]|\d\d)")


class _MarkerError(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _launches_are_marked(request, monkeypatch):
    """Fails a test that starts a Python interpreter, this project's CLI or scripts, pip or a shell without the
    ``subprocess`` marker, or a multi-device run without ``distributed``: ``make test-fast`` deselects by these
    markers, so a missing one would put a slow launch into the fast tier. Only the test's own call is checked
    (not a module- or session-scoped fixture's launch), and not other programs a library starts (W&B's
    service)."""
    marks = {m.name for m in request.node.iter_markers()}
    if {"subprocess", "distributed"} <= marks:
        return
    real = subprocess.Popen

    class CheckedPopen(real):
        def __init__(self, args, *a, **kw):
            argv = [str(x) for x in ([args] if isinstance(args, (str, os.PathLike)) else args)]
            # ours: our CLI, pip, a launcher, python -m of ours / pip / torch.distributed, or anything naming our code;
            # not a library's own helpers (a compiler, W&B's service or its `python -c` umask probe)
            ours = bool(argv) and bool(_PROGRAMS.match(os.path.basename(argv[0])))
            if "-m" in argv[:-1]:
                ours = ours or argv[argv.index("-m") + 1].startswith(("dpo_lightning", "pip", "torch.distributed"))
            in_repo = any(("dpo_lightning" in x or str(REPO) in x) and "site-packages" not in x for x in argv[1:])
            if "subprocess" not in marks and (ours or in_repo):  # a library's own helper (wandb-core) is not ours
                raise _MarkerError(f"{request.node.nodeid} starts {argv[:4]}... but is not marked "
                                   "@pytest.mark.subprocess (see pyproject.toml markers)")
            if "distributed" not in marks and any(_MANY.match(x) for x in argv):
                raise _MarkerError(f"{request.node.nodeid} starts a multi-process run but is not marked "
                                   "@pytest.mark.distributed (see pyproject.toml markers)")
            super().__init__(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", CheckedPopen)
