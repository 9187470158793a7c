"""Plain helpers shared by several test files (no fixtures: those are in conftest.py). Tests import them as
``from helpers import ...`` (pytest puts tests/ on sys.path); no test file imports another test file."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SCRIPTS = TESTS / "scripts"  # the Python files tests run in subprocesses (ruff checks them with the rest)


# ------------------------------------------------------------------ subprocesses
def script_env(**extra: str) -> dict:
    """The environment of a test subprocess: tests/scripts on PYTHONPATH (where training processes import the
    test callbacks from), then this worktree, then the caller's PYTHONPATH; ``extra`` on top."""
    path = [str(SCRIPTS), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(path), **extra}


def run_script(name: str, *args: str, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    """``python tests/scripts/<name> *args`` with ``script_env()``; output captured as text."""
    kw.setdefault("env", script_env())
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


# ------------------------------------------------------------------ engine: log-prob rows and a probing loss
V = 97  # the vocabulary of the random tiny models the engine tests build


def make_rows(seed: int = 1):
    """1-token prompt and completions, chosen longer and shorter than rejected, equal lengths."""
    g = torch.Generator().manual_seed(seed)

    def r(n):
        return torch.randint(4, V, (n,), generator=g).tolist()

    return [dict(prompt_ids=r(1), chosen_ids=r(1), rejected_ids=r(6), index=0),
            dict(prompt_ids=r(9), chosen_ids=r(11), rejected_ids=r(2), index=1),
            dict(prompt_ids=r(4), chosen_ids=r(1), rejected_ids=r(1), index=2),
            dict(prompt_ids=r(2), chosen_ids=r(5), rejected_ids=r(5), index=3)]


def run(model, batch, **kw):
    """(sequence log-probs, per-token log-probs sorted by (seq, pos), parameter gradients, the output)."""
    from dpo_lightning.engine.logprobs import sequence_logps

    model.zero_grad(set_to_none=True)
    out = sequence_logps(model, batch, batch["num_sequences"], **kw)
    w = torch.linspace(-1.0, 1.5, out.logps.numel())  # an arbitrary loss mixing every sequence
    ((out.logps * w).sum() + 0.1 * out.token_logps.square().sum()).backward()
    order = torch.argsort(out.seq * 10_000 + out.pos)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return out.logps.detach(), out.token_logps.detach()[order], grads, out


def rows_of(tokenizer, n=6):
    """``n`` (at most 6) tokenized pairs of random ids of ``tokenizer``'s vocabulary, of varied lengths."""
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)

    def r(k):
        return torch.randint(4, vocab, (k,), generator=g).tolist()

    lens = [(1, 1, 5), (7, 9, 2), (3, 4, 4), (2, 1, 1), (5, 6, 3), (4, 2, 8)]
    return [{"index": i, "prompt_ids": r(p), "chosen_ids": r(c), "rejected_ids": r(x)}
            for i, (p, c, x) in enumerate(lens[:n])]


# ------------------------------------------------------------------ losses: the shared hand-derived example
def sp(t: float) -> float:
    """softplus"""
    return math.log1p(math.exp(t))


def pair(**over):
    """Two pairs: chosen log-ratios [1, 0], rejected [-1, 1] (gap [2, -1]), lengths, chosen NLL 0.7."""
    from dpo_lightning.losses import LossInputs

    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    x = LossInputs(chosen_logps=t([-1.0, -2.0]), rejected_logps=t([-3.0, -1.0]),
                   ref_chosen_logps=t([-2.0, -2.0]), ref_rejected_logps=t([-2.0, -2.0]),
                   chosen_lengths=torch.tensor([2, 4]), rejected_lengths=torch.tensor([1, 2]), chosen_nll=t(0.7))
    for k, v in over.items():
        setattr(x, k, v if v is None or torch.is_tensor(v) else t(v))
    return x


def ref_free(**over):
    """``pair()`` without reference log-probs (reference-free losses)."""
    return pair(ref_chosen_logps=None, ref_rejected_logps=None, **over)


def close(t: torch.Tensor, expected) -> None:
    torch.testing.assert_close(t.float(), torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ data validation: one row per reason
# completions start with a space: "on" is a word of the tiny vocabulary, "onthe" is not (a boundary mismatch)
OK_ROW = {"prompt": "the cat sat on", "chosen": " the mat", "rejected": " the dog"}
# (row, reason) for every reason; the tiny word-level tokenizer splits on whitespace and punctuation.
VALIDATION_CASES = [
    ({"prompt": "the cat", "chosen": "the mat"}, "missing_field"),
    ({"prompt": "the cat", "chosen": 7, "rejected": "the dog"}, "non_string_field"),
    ({"prompt": "the cat", "completion": "the mat", "label": True}, "mixed_formats"),
    ({"prompt": "   ", "chosen": "the mat", "rejected": "the dog"}, "empty_field"),
    ({"prompt": "the cat", "chosen": "the mat", "rejected": "the mat"}, "identical_completions"),
    (OK_ROW, "duplicate_pair"),
    ({"prompt": "the cat </s> sat", "chosen": "the mat", "rejected": "the dog"}, "special_tokens"),
    ({"prompt": " ".join(["cat"] * 40), "chosen": "the mat", "rejected": "the dog"}, "prompt_fills_max_length"),
    ({"prompt": "the cat", "chosen": " ".join(["mat"] * 40), "rejected": "the dog"}, "completion_truncated"),
    ({"prompt": "the c", "chosen": "at sat", "rejected": "at mat"}, "prompt_boundary_mismatch"),
]


def load_script(name: str):
    """Import tests/scripts/<name> as a module in this process (a fresh module object on each call)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(name).stem, SCRIPTS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ vision-language models
def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


# The tiny image-text-to-text models (models/tiny_vlm.py) are built for transformers 5 (its processors, named extra
# special tokens); CI's lowest environment (transformers 4.57) skips every vision test with this marker.
requires_vision = pytest.mark.skipif(_transformers_major() < 5, reason="vision models need transformers >= 5")


def needs_for_family(family: str) -> None:
    """Skip unless the family's processor can be built here: torchvision for the families that need it,
    num2words for SmolVLM's processor."""
    from dpo_lightning.models.tiny_vlm_families import FAMILY_SPECS

    if FAMILY_SPECS[family].needs_torchvision:
        pytest.importorskip("torchvision")
    if family == "smolvlm":
        pytest.importorskip("num2words")


def shape_image(side: int = 40, colour: str = "red", size: tuple[int, int] | None = None):
    """A generated PIL image: a coloured disc on white."""
    from PIL import Image, ImageDraw

    w, h = size or (side, side)
    im = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(im).ellipse([2, 2, w - 3, h - 3], fill=colour)
    return im


VISION_PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the shape ?"}]}]


# The vision families the fast tier checks (1-D and multimodal rotary positions, bidirectional image blocks, a
# prefix-LM, images nested per sample); the full matrix runs in the slow tier (make test, CI).
FAST_VISION_FAMILIES = ("llava", "qwen2_vl", "gemma3", "paligemma", "idefics3")


def vision_family_params(families) -> list:
    """``families`` as pytest params: those outside ``FAST_VISION_FAMILIES`` marked slow."""
    return [f if f in FAST_VISION_FAMILIES else pytest.param(f, marks=pytest.mark.slow) for f in families]
