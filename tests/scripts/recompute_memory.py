"""Activation memory kept by a forward (RSS with big blocks returned on free) of a 4-layer Llama, plain and with
selective recompute. Prints ``KEPT <plain MiB> <selective MiB>``."""

import ctypes
import gc

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dpo_lightning.engine.recompute import enable_selective_recompute

ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD: big blocks are returned on free, RSS = live
torch.set_num_threads(1)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2))
ids = torch.randint(4, 97, (1, 1024))


def rss() -> int:
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) // 1024


def kept() -> int:
    gc.collect()
    before = rss()
    h = model.model(input_ids=ids, use_cache=False).last_hidden_state
    held = rss() - before
    h.square().mean().backward()
    model.zero_grad(set_to_none=True)
    return held


kept()  # warm-up
plain = kept()
enable_selective_recompute(model)
kept()  # the first call also runs the in-place probe
print("KEPT", plain, kept())
