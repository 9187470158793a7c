"""Tiny configs of the architecture families the engine is checked on (tests/test_architectures.py, the TRL
parity script scripts/trl_parity_archs.py and docs/architectures.md). Each is built offline from a config with
random weights; sliding windows (5) are shorter than the test rows, softcapping and logit scaling are set to
values that change the numbers."""

from __future__ import annotations

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
WINDOW = 5
SLIDING_FULL = ["sliding_attention", "full_attention"]
EAGER_ONLY = {"gemma2", "bloom"}  # transformers refuses sdpa for these (attention softcapping, ALiBi)

# name -> (model_type, config overrides, what it exercises)
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "llama": ("llama", {}, "the baseline: RoPE, RMSNorm, grouped-query attention, untied head"),
    "mistral": ("mistral", {"sliding_window": WINDOW}, "a sliding window on every layer: one windowed mask"),
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
              "full and sliding layers mixed (layer_types): a dict of masks, q/k/v biases"),
    "qwen3": ("qwen3", {"head_dim": 8}, "q/k RMSNorm, explicit head_dim"),
    "gemma2": ("gemma2", {"sliding_window": WINDOW, "final_logit_softcapping": 2.0, "attn_logit_softcapping": 5.0,
                          "head_dim": 8, "query_pre_attn_scalar": 8, "layer_types": SLIDING_FULL},
               "final-logit softcapping (2.0), alternating sliding layers, tied embeddings, scaled embeddings"),
    "gemma3": ("gemma3_text", {"sliding_window": WINDOW, "final_logit_softcapping": 3.0, "head_dim": 8,
                               "query_pre_attn_scalar": 8, "layer_types": SLIDING_FULL},
               "softcapping (3.0), sliding/full layers with their own RoPE, q/k norm"),
    "phi3": ("phi3", {"sliding_window": WINDOW, "pad_token_id": 0},
             "fused qkv / gate-up projections, a sliding window on every layer"),
    "starcoder2": ("starcoder2", {"sliding_window": WINDOW, "use_bias": True},
                   "a sliding window on every layer, LayerNorm, biases everywhere"),
    "granite": ("granite", {"logits_scaling": 4.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                            "attention_multiplier": 0.2}, "logits divided by logits_scaling (4.0), muP multipliers"),
    "cohere": ("cohere", {"logit_scale": 0.25}, "logits times logit_scale (0.25), tied, parallel attention/MLP"),
    "gpt2": ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
             "absolute learned positions, tied embeddings, Conv1D layers, LayerNorm"),
    "opt": ("opt", {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "word_embed_proj_dim": 32, "max_position_embeddings": 128},
            "learned positions with an offset (built from the mask without position_ids), tied"),
    "gpt_neox": ("gpt_neox", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "rotary_pct": 0.25, "use_parallel_residual": True,
                              "max_position_embeddings": 128},
                 "Pythia: partial rotary (25%), parallel residual, untied embed_out"),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True,
                            "router_aux_loss_coef": 0.05},
                "mixture of experts: the router load-balancing loss TRL adds (coef 0.05)"),
    "bloom": ("bloom", {"hidden_size": 32, "n_layer": 2, "n_head": 4},
              "ALiBi built from the 2D mask, no position_ids: tree/packed layouts run as plain"),
}


def make_config(name: str, vocab_size: int):
    from transformers import AutoConfig

    model_type, overrides, _ = FAMILIES[name]
    base = {} if model_type in ("gpt2", "opt", "gpt_neox", "bloom") else dict(SMALL)
    kw = {**base, **overrides, "vocab_size": vocab_size, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    return AutoConfig.for_model(model_type, **kw)


def build(name: str, vocab_size: int, seed: int = 0, attn_implementation: str = "sdpa"):
    """A seeded, randomly initialized tiny model of family ``name``, fp32, dropout off."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_lightning.models.hf import disable_dropout

    if FAMILIES[name][0] in EAGER_ONLY:
        attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(name, vocab_size), attn_implementation=attn_implementation,
                                             dtype=torch.float32)
    disable_dropout(model)
    return model
