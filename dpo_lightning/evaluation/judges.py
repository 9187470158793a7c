"""Judges: which of two completions of the same prompt is better, as a probability.

    judge = build_judge("OpenAssistant/reward-model-deberta-v3-large-v2")   # a reward model (path or hub id)
    judge = build_judge("my_pkg.judges:prefer_shorter")                     # a Python callable
    judge = build_judge(None)                                               # none -> None
    judge.compare(prompts, a, b)   # [n] floats in [0, 1]: P(a[i] is better than b[i])

A reward model scores each (prompt, completion) text; its preference is Bradley-Terry,
sigmoid(r(a) - r(b)). A callable takes ``(prompts, a, b)`` lists and returns one number in [0, 1] (or a bool)
per row: 1 = a wins, 0 = b wins, 0.5 = tie.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class Judge:
    """The interface: ``compare(prompts, a, b) -> [P(a_i better than b_i)]``."""

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        raise NotImplementedError


class CallableJudge(Judge):
    """A Python function ``fn(prompts, a, b) -> iterable of probabilities`` (or bools), named by import path."""

    def __init__(self, fn: Callable | str):
        self.name = fn if isinstance(fn, str) else f"{fn.__module__}:{fn.__qualname__}"
        self.fn = _import(fn) if isinstance(fn, str) else fn

    def compare(self, prompts, a, b) -> list[float]:
        out = [float(p) for p in self.fn(list(prompts), list(a), list(b))]
        if len(out) != len(prompts):
            raise ValueError(f"judge {self.name}: returned {len(out)} values for {len(prompts)} comparisons")
        bad = [p for p in out if not 0.0 <= p <= 1.0]
        if bad:
            raise ValueError(f"judge {self.name}: returned {bad[0]}; a judge returns probabilities in [0, 1]")
        return out


class RewardModelJudge(Judge):
    """A sequence-classification reward model (``AutoModelForSequenceClassification``), loaded on first use.

    Each completion is scored on ``prompt + completion`` text. One output label: its logit is the reward; two
    labels: logit(1) - logit(0). ``device`` None: the device of the first call's ``device`` argument, else CPU.
    """

    def __init__(self, name_or_path: str, *, batch_size: int = 16, max_length: int = 1024,
                 dtype: str | None = None, device: str | torch.device | None = None):
        self.name_or_path, self.batch_size, self.max_length = name_or_path, batch_size, max_length
        self.dtype, self.device = dtype, device
        self.model: Any = None  # a transformers model and tokenizer once loaded
        self.tokenizer: Any = None

    def load(self, device: str | torch.device | None = None) -> RewardModelJudge:
        if self.model is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            from dpo_lightning.models.dtypes import resolve_dtype

            try:
                tok = AutoTokenizer.from_pretrained(self.name_or_path)
                model = AutoModelForSequenceClassification.from_pretrained(
                    self.name_or_path, dtype=resolve_dtype(self.dtype) or "auto")
            except (OSError, ValueError) as err:  # ValueError: huggingface_hub < 1.0's HFValidationError for a
                # path that does not exist (read as a malformed repo id)
                raise FileNotFoundError(f"generation.judge={self.name_or_path!r}: cannot load a reward model "
                                        f"(AutoModelForSequenceClassification) from it: {err}") from None
            if model.config.num_labels not in (1, 2):
                raise ValueError(f"generation.judge={self.name_or_path!r}: a reward model has 1 output label (the "
                                 f"reward) or 2 (bad, good); this one has {model.config.num_labels}")
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token or tok.unk_token
            tok.padding_side = "right"
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tok.pad_token_id
            self.device = torch.device(self.device or device or "cpu")
            self.model, self.tokenizer = model.to(self.device).eval(), tok
        return self

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """The reward of each (prompt, completion)."""
        self.load()
        texts = [p + c for p, c in zip(prompts, completions)]
        out: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[s:s + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length).to(self.device)
            logits = self.model(**enc).logits.float()
            out += (logits[:, 0] if logits.size(1) == 1 else logits[:, 1] - logits[:, 0]).tolist()
        return out

    @staticmethod
    def preference(scores_a: Sequence[float], scores_b: Sequence[float]) -> list[float]:
        """Bradley-Terry: P(a better than b) = sigmoid(r(a) - r(b))."""
        return [1.0 / (1.0 + math.exp(-(x - y))) for x, y in zip(scores_a, scores_b)]

    def compare(self, prompts, a, b) -> list[float]:
        return self.preference(self.score(prompts, a), self.score(prompts, b))


def _import(path: str) -> Callable:
    module, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"generation.judge={path!r}: cannot import it ({err}); give 'package.module:function' "
                         "importable from the Python path") from None
    if not callable(obj):
        raise ValueError(f"generation.judge={path!r} is not callable")
    return obj


def build_judge(spec: Judge | Callable | str | None, *, batch_size: int = 16) -> Judge | None:
    """A judge from ``generation.judge``: None / "none" -> None; "pkg.module:fn" -> ``CallableJudge``;
    any other string -> ``RewardModelJudge`` (a local folder or hub id); a Judge or callable as is."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(spec, Judge):
        return spec
    if callable(spec):
        return CallableJudge(spec)
    spec = str(spec)
    if _CALLABLE.match(spec):
        return CallableJudge(spec)
    return RewardModelJudge(spec, batch_size=batch_size)
