"""Tiny configs for every causal-LM class transformers can build (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), for
tests that must hold for models the quirk table does not know (tests/test_model_fallback.py)."""

from __future__ import annotations

import warnings

import torch

# Size attributes set to tiny values wherever a config (or a sub-config) has them.
TINY = {
    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 64, "max_position_embeddings": 64,
    "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 64, "n_inner": 32, "d_model": 16, "ffn_dim": 32,
    "num_layers": 2, "num_heads": 2, "d_ff": 32, "d_kv": 8, "encoder_layers": 2, "decoder_layers": 2,
    "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
    "num_local_experts": 2, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16, "word_embed_proj_dim": 16, "intermediate_size_mlp": 32,
}
SUB_CONFIGS = ("text_config", "decoder", "encoder", "language_config", "llm_config", "thinker_config")


def shrink(cfg, depth: int = 0):
    """Set the tiny sizes on ``cfg`` and, recursively, on its sub-configs (only attributes it already has)."""
    for key, value in TINY.items():
        if hasattr(cfg, key) and isinstance(getattr(cfg, key, None), int):
            try:
                setattr(cfg, key, value)
            except (AttributeError, ValueError, TypeError):
                pass
    for key in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, key, None)
        if sub is not None and depth < 3 and hasattr(sub, "to_dict"):
            shrink(sub, depth + 1)
    for key in SUB_CONFIGS:
        sub = getattr(cfg, key, None)
        if sub is not None and depth < 3 and hasattr(sub, "to_dict") and key not in (cfg.sub_configs or {}):
            shrink(sub, depth + 1)
    vocab = getattr(cfg, "vocab_size", None)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # special ids inside the tiny vocabulary
        if isinstance(vocab, int) and isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) >= vocab:
            try:
                setattr(cfg, key, vocab - 1)
            except (AttributeError, ValueError, TypeError):
                pass
    for key in ("layer_types", "mlp_layer_types", "layers_block_type"):  # per-layer lists follow the depth
        seq = getattr(cfg, key, None)
        layers = getattr(cfg, "num_hidden_layers", None)
        if isinstance(seq, list) and isinstance(layers, int) and len(seq) != layers and seq:
            try:
                setattr(cfg, key, (seq * layers)[:layers])
            except (AttributeError, ValueError, TypeError):
                pass
    return cfg


def causal_lm_classes() -> list[tuple[str, str]]:
    """(model_type, class name) for every entry of transformers' causal-LM auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type, names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        for name in (names if isinstance(names, (list, tuple)) else [names]):
            out.append((model_type, name))
    return out


def build_on_meta(model_type: str, class_name: str):
    """(model, None) built from a tiny config on the meta device, or (None, why it could not be)."""
    import transformers
    from transformers import CONFIG_MAPPING

    cls = getattr(transformers, class_name, None)
    if cls is None:
        return None, f"transformers has no {class_name} (needs an optional dependency?)"
    config_class = getattr(cls, "config_class", None) or CONFIG_MAPPING[model_type]
    try:
        cfg = shrink(config_class())
    except Exception as exc:  # noqa: BLE001
        return None, f"config: {type(exc).__name__}: {str(exc)[:120]}"
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return cls(cfg), None
    except Exception as exc:  # noqa: BLE001
        return None, f"model: {type(exc).__name__}: {str(exc)[:120]}"
