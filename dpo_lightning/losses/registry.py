"""The loss registry: every preference objective is a small pure function plus its metadata.

A loss function takes a ``LossInputs`` and keyword hyperparameters and returns a ``LossOutput``.
Its metadata travels with it (``LossSpec``): does it need a reference, is the data paired, are the
sequence log-probs length-normalized before the loss sees them, does it need KTO's mismatched KL rows,
which input modifiers (LD-DPO ``ld_alpha``, WPO ``use_weighting``) it supports. The module reads only
metadata; it never branches on a loss name.

    get_loss("sigmoid", beta=0.1)    # -> Loss, a picklable callable carrying spec + hyperparameters
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LossInputs:
    """Everything a loss may read. Paired losses: B pairs; unpaired: B completions (+ optional KL rows).

    Sequence log-probs are sums over completion tokens, or means when the loss is ``length_normalized``.
    """

    chosen_logps: torch.Tensor | None = None  # [B]
    rejected_logps: torch.Tensor | None = None  # [B]
    ref_chosen_logps: torch.Tensor | None = None  # [B]
    ref_rejected_logps: torch.Tensor | None = None  # [B]
    chosen_lengths: torch.Tensor | None = None  # [B] completion tokens
    rejected_lengths: torch.Tensor | None = None  # [B]
    chosen_nll: torch.Tensor | None = None  # [] token-mean NLL of the chosen completions (TRL's nll_loss)
    chosen_weights: torch.Tensor | None = None  # [B] WPO: exp(mean aligned log-prob), no grad
    rejected_weights: torch.Tensor | None = None  # [B]
    # unpaired (KTO, BCO, ...)
    logps: torch.Tensor | None = None  # [B]
    ref_logps: torch.Tensor | None = None  # [B]
    labels: torch.Tensor | None = None  # [B] bool, True = desirable
    kl_logps: torch.Tensor | None = None  # [B] mismatched (prompt i, completion i-1) pairs
    ref_kl_logps: torch.Tensor | None = None  # [B]
    state: dict[str, Any] = field(default_factory=dict)  # running statistics a loss keeps (BCO's reward mean)


@dataclass
class LossOutput:
    """Scalar loss to backpropagate, per-example losses and rewards (detached) and extra metrics."""

    loss: torch.Tensor  # []
    losses: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B] (paired) or rewards of desirable rows (unpaired)
    rejected_rewards: torch.Tensor  # [B] (paired) or rewards of undesirable rows (unpaired)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. {"nll_loss": ..., "kl": ...}


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric hyperparameter: an interval, open or closed at each end."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return (value > self.lo if self.lo_open else value >= self.lo) and (
            value < self.hi if self.hi_open else value <= self.hi)

    def __str__(self) -> str:
        def num(v):
            return "inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:g}"
        return f"{'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


POSITIVE, NON_NEGATIVE, UNIT = Range(0, lo_open=True, hi_open=True), Range(0, hi_open=True), Range(0, 1)
# Valid ranges by hyperparameter name, for every loss that takes it (``register(ranges=...)`` overrides one).
HPARAM_RANGES: dict[str, Range] = {
    "beta": POSITIVE,                               # inverse temperature; 0 makes every loss constant
    "label_smoothing": Range(0, 0.5, hi_open=True),  # cDPO / rDPO flip rate: (1 - 2 eps) divides
    "gamma": NON_NEGATIVE,                          # SimPO / AlphaPO target margin
    "alpha": Range(-math.inf, math.inf, True, True),  # AlphaPO reward shape (any finite value; 0 = SimPO)
    "cpo_alpha": NON_NEGATIVE, "rpo_alpha": NON_NEGATIVE,  # NLL weights
    "desirable_weight": POSITIVE, "undesirable_weight": POSITIVE,  # KTO lambda_D, lambda_U
    "discopop_tau": POSITIVE,                       # DiscoPOP mixing temperature (divides)
    "f_alpha_divergence_coef": Range(0, 1, lo_open=True),  # f-DPO alpha divergence (1 = reverse KL)
    "ld_alpha": UNIT,                               # LD-DPO weight of the verbose tail
    "sigmoid_weight": NON_NEGATIVE, "bco_pair_weight": NON_NEGATIVE, "sft_weight": NON_NEGATIVE,  # MPO
}
NOT_NUMERIC = frozenset({"losses", "weights", "f_divergence_type", "use_weighting"})  # checked by their binds


def check_ranges(name: str, hparams: dict[str, Any], ranges: Mapping[str, Range]) -> None:
    """Raise ``ValueError`` naming ``loss.<key>=<value>`` and its valid range for a value outside it."""
    for key, value in hparams.items():
        rng = ranges.get(key)
        if rng is None or value is None:
            continue
        if value not in rng:
            what = "lie in" if isinstance(value, (int, float)) and not isinstance(value, bool) else "be a number in"
            raise ValueError(f"loss.{key}={value}: must {what} {rng} (loss {name!r})")


MODIFIERS = ("ld_alpha", "use_weighting")  # read by the module when it builds LossInputs
PAIRED_MODIFIERS = MODIFIERS  # default for paired, reference-based losses (as TRL's DPOTrainer allows)


@dataclass(frozen=True)
class LossSpec:
    """A registry entry. ``bind`` normalizes/validates hyperparameters once (``get_loss``); ``resolve``
    derives metadata from hyperparameters (combinations); both are None for ordinary losses."""

    name: str
    fn: Callable[..., LossOutput]
    paper: str
    requires_reference: bool = True
    paired: bool = True
    length_normalized: bool = False
    needs_kl_pairs: bool = False
    modifiers: tuple[str, ...] = ()
    bind: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    resolve: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    range_overrides: tuple[tuple[str, Range], ...] = ()

    @property
    def ranges(self) -> dict[str, Range]:
        """Valid range of each numeric hyperparameter (``HPARAM_RANGES`` by name, then this loss's own)."""
        own = dict(self.range_overrides)
        return {k: own[k] if k in own else HPARAM_RANGES[k] for k in sorted(self.keywords | set(self.modifiers))
                if k in own or k in HPARAM_RANGES}

    @property
    def keywords(self) -> frozenset[str]:
        """Keyword-only hyperparameters of ``fn``."""
        return frozenset(k for k, p in inspect.signature(self.fn).parameters.items()
                         if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @property
    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in inspect.signature(self.fn).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}


LOSSES: dict[str, LossSpec] = {}


def register(name: str, *, paper: str, requires_reference: bool = True, paired: bool = True,
             length_normalized: bool = False, needs_kl_pairs: bool = False,
             modifiers: tuple[str, ...] | None = None, bind=None, resolve=None,
             ranges: dict[str, Range] | None = None):
    """Decorator: add ``fn`` to ``LOSSES`` under ``name`` with its metadata.

    ``modifiers`` defaults to ``("ld_alpha", "use_weighting")`` for paired reference-based losses and to
    none otherwise. ``ranges`` gives a hyperparameter a valid range other than ``HPARAM_RANGES``'s (every
    numeric hyperparameter needs one; ``get_loss`` refuses a value outside it).
    """

    def wrap(fn):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        mods = modifiers if modifiers is not None else (PAIRED_MODIFIERS if paired and requires_reference else ())
        LOSSES[name] = LossSpec(name, fn, paper, requires_reference, paired, length_normalized, needs_kl_pairs,
                                tuple(mods), bind, resolve, tuple(sorted((ranges or {}).items())))
        return fn

    return wrap


@dataclass
class Loss:
    """A registry entry bound to hyperparameters. Picklable (it stores the name, not the function)."""

    name: str
    hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> LossSpec:
        return LOSSES[self.name]

    def _meta(self, key: str):
        spec = self.spec
        if spec.resolve is not None:
            resolved = spec.resolve(self.hparams)
            if key in resolved:
                return resolved[key]
        return getattr(spec, key)

    @property
    def requires_reference(self) -> bool:
        return bool(self._meta("requires_reference"))

    @property
    def paired(self) -> bool:
        return bool(self._meta("paired"))

    @property
    def length_normalized(self) -> bool:
        return bool(self._meta("length_normalized"))

    @property
    def needs_kl_pairs(self) -> bool:
        """True when unpaired batches must carry TRL KTO's mismatched KL rows (datamodule ``kl_pairs``)."""
        return bool(self._meta("needs_kl_pairs"))

    @property
    def beta(self) -> float:
        return float(self.hparams.get("beta", 0.1))

    def __call__(self, inputs: LossInputs) -> LossOutput:
        keywords = self.spec.keywords
        return self.spec.fn(inputs, **{k: v for k, v in self.hparams.items() if k in keywords})


def plain(value: Any) -> Any:
    """Hydra/OmegaConf containers and tuples -> plain dicts and lists (picklable, comparable)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value


def get_loss(name: str, **hparams: Any) -> Loss:
    """Bind registry entry ``name`` to hyperparameters, checking them against the function's signature.

    Accepted: the function's keyword-only arguments plus the entry's ``modifiers`` (``ld_alpha``,
    ``use_weighting``), which the module applies when it builds ``LossInputs``.
    """
    import dpo_lightning.losses  # noqa: F401  (registers every family)

    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; available: {', '.join(sorted(LOSSES))}")
    spec = LOSSES[name]
    accepted = spec.keywords | set(spec.modifiers)
    unknown = set(hparams) - accepted
    if unknown:
        raise TypeError(f"loss {name!r} got unknown hyperparameter(s) {sorted(unknown)}; "
                        f"it accepts {sorted(accepted)}")
    bound = plain({**spec.defaults, **hparams})
    if bound.get("use_weighting") is False:
        bound.pop("use_weighting")  # False == absent: keeps get_loss(x) == get_loss(x, use_weighting=False)
    if "ld_alpha" in bound and bound["ld_alpha"] is None:
        bound.pop("ld_alpha")
    check_ranges(name, bound, spec.ranges)
    if spec.bind is not None:
        bound = spec.bind(bound)
    return Loss(name, bound)
