"""A model the quirk table does not know falls back to its own forward, never crashes.

Every causal-LM class transformers can build from a tiny config goes through ``engine_plan`` (and the other
places the engine reads a model's structure) on the meta device; a text-only Llama 4, whose
``base_model_prefix`` (``language_model``) names no submodule, computes its log-probs through its own forward,
equal to a hand-written log-softmax over its logits, with the probe's one-line note saying why.
"""

from __future__ import annotations

import pytest
import torch

from dpo_lightning.data.layouts import PACKED_UNSHARED, PLAIN, PREFIX_SHARED, layout_batch
from dpo_lightning.engine.logprobs import sequence_logps, split_model
from dpo_lightning.engine.probe import summary, verify
from dpo_lightning.engine.recompute import decoder_layers
from dpo_lightning.models.quirks import engine_plan
from tests.model_zoo import build_on_meta, causal_lm_classes

MIN_WALKED = 150  # transformers 5.25 builds 178 of its 200 causal-LM classes from tiny configs


@pytest.mark.slow  # 25-45 s: imports and builds every causal-LM class transformers has
def test_engine_plan_reads_every_causal_lm_class_or_falls_back():
    walked, skipped, failed = [], {}, {}
    for model_type, name in causal_lm_classes():
        model, why = build_on_meta(model_type, name)
        if model is None:
            skipped[name] = why  # cannot be built from a tiny config (optional package, strict validators)
            continue
        try:
            plan = engine_plan(model)
            backbone, head = split_model(model)
            decoder_layers(model)
            assert PLAIN in plan.layouts
            if plan.head is None:
                assert plan.head_note, f"{name}: no head rule and no note saying why"
            if backbone is None:  # nothing guessed: the model's own forward, plain rows, with the reason
                assert plan.head is None and plan.layouts == {PLAIN} and plan.layout_note
        except Exception as exc:  # noqa: BLE001 - collect them all, then fail once with the list
            failed[name] = f"{type(exc).__name__}: {exc}"
        walked.append(name)
    assert not failed, failed
    assert len(walked) >= MIN_WALKED, (len(walked), skipped)
    assert "Llama4ForCausalLM" in walked


def _tiny_llama4(vocab: int = 64):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           max_position_embeddings=128, num_local_experts=2, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    return Llama4ForCausalLM(cfg).eval()


def _own_logps(model, prompts, completions) -> torch.Tensor:
    """Sum of completion-token log-probs, one unpadded sequence at a time, from the model's own logits."""
    out = []
    for comp in completions:
        for prompt, c in zip(prompts, comp):
            ids = torch.tensor([prompt + c])
            logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]  # [L, V]
            n = len(prompt)
            out.append(sum(logp[n - 1 + j, tok] for j, tok in enumerate(c)))
    return torch.stack(out)


def test_llama4_text_model_falls_back_to_its_own_forward():
    model = _tiny_llama4()
    backbone, _ = split_model(model)
    assert backbone is None  # base_model_prefix 'language_model' names no submodule: nothing is guessed
    plan = engine_plan(model)
    assert plan.head is None and plan.layouts == {PLAIN}
    assert "language_model" in plan.head_note
    assert plan.aux is not None and plan.router_logits  # the MoE router loss is still read from the config

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (5, 3)]
    completions = [[torch.randint(3, 64, (n,), generator=g).tolist() for n in ns] for ns in ((4, 2), (3, 5))]
    with torch.no_grad():
        want = _own_logps(model, prompts, completions)
        for layout in (PLAIN, PREFIX_SHARED, PACKED_UNSHARED):  # tree layouts run as plain rows
            batch = layout_batch(layout, prompts, completions, pad_token_id=0)
            got = sequence_logps(model, batch, batch["num_sequences"])
            torch.testing.assert_close(got.logps, want, atol=1e-5, rtol=1e-5)

    lines = verify(model, label="policy")
    line = summary(lines)
    assert line is not None and "\n" not in line and "language_model" in line and "model's own head" in line


def test_llama4_text_model_trains_through_the_module(tmp_path):
    """dpo-eval's and dpo-train's path: loaded with from_pretrained, probed, a loss with gradients."""
    from dpo_lightning import ModelSpec, PreferenceDataModule, PreferenceLitModule
    from dpo_lightning.models.tiny import build_tokenizer

    tok = build_tokenizer()
    _tiny_llama4(vocab=len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    spec = ModelSpec(str(tmp_path), dtype="float32")
    module = PreferenceLitModule(spec, loss="sigmoid")
    module.verify_engine()
    dm = PreferenceDataModule("builtin:default_prefs", spec, batch_size=4, max_length=48, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    out, _ = module.compute_loss(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.policy.parameters())
