"""Load a Hugging Face causal LM and its tokenizer: hub id, local folder, or a built-in tiny model.

Everything goes through the real ``from_pretrained`` path; ``builtin:tiny-llama`` is first built from a
config and saved with ``save_pretrained`` (see ``tiny.py``), so tests and the offline default exercise the
same code a user's ``meta-llama/...`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpo_lightning.models.dtypes import resolve_dtype
from dpo_lightning.models.quantization import bnb_config, keep_off_cpu_packed_path
from dpo_lightning.models.vision import is_vision_model, quantization_skip_modules, text_tokenizer


@dataclass
class ModelSpec:
    """Where a causal LM comes from and how to load it (the ``model`` config group binds to this).

    Attributes:
        name_or_path: hub id, local folder, or ``builtin:tiny-llama`` / ``builtin:tiny-vlm[-<family>]`` (built
            offline from a config).
        dtype: parameter dtype: ``float32`` | ``bfloat16`` | ``float16`` | ``auto``.
        attn_implementation: ``sdpa`` | ``eager`` | ``flash_attention_2`` | None (transformers' default).
        trust_remote_code: allow custom modeling code from the hub.
        revision: hub revision (branch, tag or commit).
        tiny: keyword overrides for the built-in tiny model's config (only for ``builtin:`` names).
        quantization: a bitsandbytes config mapping (see ``models/quantization.py``), or None.
        freeze_vision: for an image-text-to-text model, train the language model only: the vision tower and the
            projector are frozen (``models/vision.py: freeze_vision_tower``); no effect on a text model.
    """

    name_or_path: str = "builtin:tiny-llama"
    dtype: str = "float32"
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    revision: str | None = None
    tiny: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    freeze_vision: bool = True


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded: the message names the path or hub id, what was looked for,
    and the fix (a local folder, ``HF_HUB_OFFLINE=1`` with a cached model, a token)."""


FIXES = ("give a local folder saved with save_pretrained, a cached hub id with HF_HUB_OFFLINE=1, or, for a "
         "gated or private model, a token (huggingface-cli login or HF_TOKEN)")


def _looks_local(name: str) -> bool:
    """A path, not a hub id (``org/name`` or ``name``): starts with . / ~, or has more than one slash."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or Path(name).exists()


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def check_source(spec: ModelSpec, what: str = "model") -> None:
    """Fail fast (``ModelLoadError``, one line) when ``spec.name_or_path`` is a missing local folder, a folder
    without a saved model, or a hub id that is neither cached nor reachable (instead of a 200-line traceback
    or a minute of retries)."""
    name = spec.name_or_path
    if name.startswith("builtin:"):
        return  # built offline (tiny.py); an unknown built-in name raises there
    field_name = f"{what} {name!r}"
    if _looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"{field_name}: no such folder ({path.resolve()}); looked for a local model folder "
                                 f"(config.json, weights, tokenizer files); {FIXES}")
        found = ("config.json", "adapter_config.json") + (
            ("tokenizer.json", "tokenizer_config.json") if what == "tokenizer" else ())  # a tokenizer-only folder
        if not any((path / name).exists() for name in found):
            raise ModelLoadError(f"{field_name}: {path.resolve()} has none of {', '.join(found)} (not a "
                                 f"save_pretrained folder); {FIXES}")
        return
    import os

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json", revision=spec.revision)
    except Exception as err:  # an invalid repo id
        raise ModelLoadError(f"{field_name}: not a local folder and not a valid hub id ({err}); {FIXES}") from None
    if isinstance(cached, str) or constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE") in ("1", "true"):
        return  # cached, or offline: from_pretrained reads the cache and says what is missing
    if not _hub_reachable():
        raise ModelLoadError(f"{field_name}: not a local folder, not in the hub cache, and {constants.ENDPOINT} "
                             f"cannot be reached; {FIXES}")


def _from_pretrained(load, spec: ModelSpec, what: str, *args, **kwargs):
    """``load(*args, **kwargs)`` (a ``from_pretrained``) with loading failures turned into one-line
    ``ModelLoadError``s."""
    check_source(spec, what)
    try:
        return load(*args, **kwargs)
    except OSError as err:  # missing files, gated/private repos, network errors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{what} {spec.name_or_path!r}: cannot load it ({first}); {FIXES}") from None


def resolve_path(spec: ModelSpec) -> str:
    """A path ``from_pretrained`` can read: builtin models are materialized on disk first."""
    if spec.name_or_path.startswith("builtin:tiny-vlm"):
        from dpo_lightning.models import tiny_vlm

        return str(tiny_vlm.materialize(spec.name_or_path.split(":", 1)[1], **dict(spec.tiny or {})))
    if spec.name_or_path.startswith("builtin:"):
        from dpo_lightning.models.tiny import materialize

        return str(materialize(spec.name_or_path.split(":", 1)[1], **dict(spec.tiny or {})))
    return spec.name_or_path


def load_config(spec: ModelSpec, path: str | None = None):
    """The model's config (``AutoConfig``), or None when the folder or hub id has none (a tokenizer-only folder)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path or resolve_path(spec), revision=spec.revision,
                                          trust_remote_code=spec.trust_remote_code)
    except Exception:  # no config.json: the loaders below say what is missing
        return None


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer with a pad token (falls back to EOS, then UNK, as TRL does). For an image-text-to-text
    model, its processor (``AutoProcessor``: tokenizer + image processor), the pad token set on its tokenizer
    (``models.vision.text_tokenizer`` gives the tokenizer of either)."""
    from transformers import AutoProcessor, AutoTokenizer

    path = resolve_path(spec)
    check_source(spec, "tokenizer")
    load = AutoProcessor.from_pretrained if is_vision_model(load_config(spec, path)) else AutoTokenizer.from_pretrained
    processing_class = _from_pretrained(load, spec, "tokenizer", path, revision=spec.revision,
                                        trust_remote_code=spec.trust_remote_code)
    tok = text_tokenizer(processing_class)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.eos_token is None:
        raise ValueError(f"tokenizer of {spec.name_or_path!r} has no EOS token; set one in its tokenizer_config.json")
    return processing_class


def load_causal_lm(spec: ModelSpec, *, device_map: Any = None):
    """Load the model in eval-free training form: dropout disabled (as in the DPO paper), no KV cache.

    An image-text-to-text model (its config says so: ``models.vision.is_vision_model``) loads with
    ``AutoModelForImageTextToText``; quantized, its vision tower, projector and LM head stay in full precision
    unless ``quantization.skip_modules`` says otherwise. ``spec.freeze_vision`` is applied where the policy is
    built (``training/module.py``), not here."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    path = resolve_path(spec)
    check_source(spec, "model")
    config = load_config(spec, path)
    vision = is_vision_model(config)
    kwargs: dict[str, Any] = dict(
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        dtype=resolve_dtype(spec.dtype) or "auto",
    )
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.quantization:
        kwargs["quantization_config"] = bnb_config(spec.quantization)
        skip = quantization_skip_modules(config) if vision else None
        if skip and kwargs["quantization_config"] is not None and not spec.quantization.get("skip_modules"):
            kwargs["quantization_config"].llm_int8_skip_modules = skip
        if device_map is None:
            device_map = {"": _default_device()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    load = AutoModelForImageTextToText.from_pretrained if vision else AutoModelForCausalLM.from_pretrained
    model = _from_pretrained(load, spec, "model", path, **kwargs)
    if spec.quantization:
        keep_off_cpu_packed_path(model)  # bitsandbytes' AVX512-BF16 layout: shape limits, bf16, no autograd
    disable_dropout(model)
    model.config.use_cache = False
    return model


def _default_device() -> str:
    """This process's device: under DDP/torchrun each rank loads its quantized copy on its own GPU."""
    if not torch.cuda.is_available():
        return "cpu"
    import os

    return f"cuda:{int(os.environ.get('LOCAL_RANK', torch.cuda.current_device()))}"


_DROPOUT_ATTRS = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "residual_dropout",
                  "resid_pdrop", "layerdrop")


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (DPO paper, App. B; TRL's ``disable_dropout``)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for key in _DROPOUT_ATTRS:  # functional dropout / layer drop read from a float attribute (OPT, ...)
            if isinstance(getattr(module, key, None), float) and not isinstance(module, torch.nn.Dropout):
                setattr(module, key, 0.0)
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` a frozen reference: eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model
