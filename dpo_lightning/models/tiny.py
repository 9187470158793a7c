"""Built-in tiny causal LMs, made offline from a config and saved with ``save_pretrained``.

``materialize("tiny-llama")`` writes a randomly initialized (seeded) Llama and a word-level tokenizer to a
cache folder once and returns the folder; every later load goes through the real ``from_pretrained`` path.
The tokenizer's vocabulary covers the embedded default dataset plus a small alphabet, and it carries a chat
template, so the same model serves the default run, tests with conversational data and quick experiments.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path

from dpo_lightning.files import disk_cache

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %} </s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


def cache_root() -> Path:
    """Where built-in models are kept (``$DPO_LIGHTNING_CACHE`` or ``~/.cache/dpo_lightning``)."""
    return disk_cache.cache_root()


def default_vocab() -> list[str]:
    """Special tokens, then every word of the embedded dataset, a few greetings, letters, digits and punctuation."""
    words: set[str] = set()
    text = resources.files("dpo_lightning.assets").joinpath("default_prefs.jsonl").read_text()
    for line in text.splitlines():
        for value in json.loads(line).values():
            words.update(str(value).split())
    words.update("user assistant system human : ? ! . , ' - ( ) 0 1 2 3 4 5 6 7 8 9".split())
    words.update("hello hi hey good what can may".split())  # greetings for examples and tests (``hi . -> hello !``)
    words.update("abcdefghijklmnopqrstuvwxyz")
    return SPECIALS + sorted(words - set(SPECIALS))


def build_tokenizer(words: list[str] | None = None, **special_kwargs):
    """A word-level fast tokenizer (whitespace + punctuation split) with EOS, PAD and a chat template.

    ``words`` replaces ``default_vocab()`` (the specials first); ``special_kwargs`` go to the tokenizer's
    constructor (the vision models pass their named image tokens as ``extra_special_tokens``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(words or default_vocab())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>", **special_kwargs)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(vocab_size: int, seed: int = 0, **overrides):
    """A seeded, randomly initialized ``LlamaForCausalLM`` from a config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                      **{**TINY_LLAMA, **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def materialize(name: str = "tiny-llama", seed: int = 0, **overrides) -> Path:
    """Build ``name`` once into the cache and return its folder (written atomically: temp dir + rename)."""
    if name != "tiny-llama":
        raise ValueError(f"unknown built-in model 'builtin:{name}'; available: 'builtin:tiny-llama'")
    key = hashlib.sha256(json.dumps([default_vocab(), seed, TINY_LLAMA, overrides], sort_keys=True).encode())
    target = cache_root() / "builtin" / f"{name}-{key.hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target
    tmp = disk_cache.staging_folder(target)
    try:
        tok = build_tokenizer()
        build_model(len(tok), seed=seed, **overrides).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # another process that won the race wrote an identical copy: keep theirs
        disk_cache.publish_folder(tmp, target, complete=lambda entry: (entry / "config.json").exists())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
