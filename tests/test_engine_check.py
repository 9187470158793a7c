"""The probe (engine_check.py), LoRA on the LM head, and bf16: the fast path gives the model's own numbers or
steps aside, saying so in one line."""

from __future__ import annotations

import types

import pytest
import torch
from arch_families import build
from helpers import V, make_rows, run

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.engine.logprobs import sequence_logps
from dpo_lightning.engine.probe import EngineCheckError, check, summary, verify
from dpo_lightning.models.quirks import EnginePlan, HeadRule, engine_plan, head_rule
from dpo_lightning.models.tiny import build_model


def scaled_forward(model, factor: float):
    """Patch the instance's forward to scale its logits, as wrappers do (TRL's fused head patches it so too):
    the class's code, which quirks.py reads, no longer says what the model computes."""
    own = model.forward

    def forward(self, *args, **kwargs):
        out = own(*args, **kwargs)
        out.logits = out.logits * factor
        return out

    model.forward = types.MethodType(forward, model)
    return model


def test_probe_replaces_a_head_it_cannot_confirm():
    model = scaled_forward(build_model(V, seed=0, hidden_size=32, intermediate_size=64).float(), 0.5)
    plan = engine_plan(model)
    assert plan.head == HeadRule()  # the class looks standard
    with torch.no_grad():
        changes = check(model, plan)
    assert plan.head is None and len(changes) == 1 and "own head" in changes[0], changes
    rows = make_rows()
    ref = run(model, PreferenceCollator(0)(rows), full_logits=True)
    got = run(model, PreferenceCollator(0, layout="prefix_shared")(rows))
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)


def test_probe_drops_a_layout_whose_mask_is_wrong():
    model = build("mistral", V)
    plan = engine_plan(model)
    wrong = EnginePlan(**{**plan.__dict__, "windows": {"full_attention": None}})  # a mask without the window
    with torch.no_grad():
        changes = check(model, wrong)
    assert wrong.layouts == {"plain"} and len(changes) == 2, changes
    assert wrong.head == plan.head  # the head was right
    with torch.no_grad():
        assert check(model, plan) == [] and plan.layouts == {"plain", "prefix_shared", "packed", "packed_unshared"}


def test_class_with_its_own_logit_transform_is_not_guessed():
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states) * 2.0
            loss = None
            return types.SimpleNamespace(logits=logits, loss=loss)

    rule, why = head_rule(Scaled(build_model(V).config))
    assert rule is None and "* 2.0" in why


def test_non_finite_own_forward_stops_with_a_clear_error():
    model = scaled_forward(build_model(V, seed=0, hidden_size=32, intermediate_size=64).float(), float("nan"))
    with pytest.raises(EngineCheckError, match="non-finite"):
        verify(model, label="policy")


def test_module_says_once_what_it_switched_and_the_switch_turns_the_probe_off(tiny_path, capsys):
    from dpo_lightning import PreferenceLitModule, get_loss

    batch = PreferenceCollator(0, layout="prefix_shared")(make_rows())
    for flag in (True, False):
        module = PreferenceLitModule(str(tiny_path), loss=get_loss("sigmoid", beta=0.1), verify=flag)
        scaled_forward(module.policy, 0.5)
        scaled_forward(module.reference.module, 0.5)
        capsys.readouterr()
        with torch.no_grad():
            module.compute_loss(batch)
            module.compute_loss(batch)
        lines = [ln for ln in capsys.readouterr().out.splitlines() if "[dpo_lightning] engine" in ln]
        own = module.policy(input_ids=torch.tensor([[5, 6, 7]])).logits.float().log_softmax(-1)[0, 1, 7]
        mine = module.policy_logps(PreferenceCollator(0)([{"prompt_ids": [5, 6], "chosen_ids": [7],
                                                           "rejected_ids": [8], "index": 0}])).token_logps[0]
        if flag:
            assert len(lines) == 1 and "policy: chunked LM head" in lines[0] and "reference:" in lines[0], lines
            torch.testing.assert_close(mine.detach(), own.detach(), atol=1e-5, rtol=0)
        else:  # trusted: the static plan's chunked head, which does not see the patched forward
            assert lines == [] and module.policy_plan.head is not None
            assert (mine - own).abs() > 1e-3
    assert summary([]) is None


@pytest.mark.parametrize("dropout", [0.0])
def test_lora_on_the_lm_head_is_read_with_its_adapter(dropout):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = build_model(V, seed=0, hidden_size=32, intermediate_size=64).float()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                            lora_dropout=dropout, init_lora_weights=False))
    rows = make_rows()

    def lora_run(batch, **kw):  # (token log-probs, gradients of the LoRA weights)
        model.zero_grad(set_to_none=True)
        out = sequence_logps(model, batch, batch["num_sequences"], **kw)
        (out.logps * torch.linspace(-1, 1.5, out.logps.numel())).sum().backward()
        order = torch.argsort(out.seq * 10_000 + out.pos)
        return out.token_logps.detach()[order], {k: p.grad.clone() for k, p in model.named_parameters()
                                                 if p.grad is not None}

    ref, ref_g = lora_run(PreferenceCollator(0)(rows), full_logits=True)
    got, g = lora_run(PreferenceCollator(0, layout="packed")(rows), chunk_size=5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert len([k for k in ref_g if "lm_head.lora" in k]) == 2 and ref_g.keys() == g.keys()
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], atol=1e-5, rtol=1e-4, msg=k)
    with model.disable_adapter(), torch.no_grad():  # the adapter-disabled reference: the base head
        base_ref = sequence_logps(model, PreferenceCollator(0)(rows), 8, full_logits=True).logps
        base_got = sequence_logps(model, PreferenceCollator(0, layout="packed")(rows), 8).logps
    torch.testing.assert_close(base_got, base_ref, atol=1e-5, rtol=1e-5)
    assert (base_ref - sequence_logps(model, PreferenceCollator(0)(rows), 8).logps).abs().max() > 1e-3


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "granite"])
def test_bf16_chunked_head_matches_the_models_own_bf16_forward(precision, family):
    """Same precision, same numbers up to bf16 noise: the head's matmul runs in bf16 under autocast too."""
    model = build(family, V)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    rows = make_rows()
    fp32 = run(build(family, V), PreferenceCollator(0)(rows), full_logits=True)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        own = run(model, PreferenceCollator(0)(rows), full_logits=True)
        fast = run(model, PreferenceCollator(0)(rows), chunk_size=5)
    # the model's own bf16 numbers move away from fp32 (by `gap`); the fast path stays on them. A head computed
    # in fp32 under autocast (the old engine) lands about `gap` away: 0.7-1.0 x gap here
    gap = (own[1] - fp32).abs().max()
    assert gap > 1e-4
    assert (fast[1] - own[1]).abs().max() <= 0.05 * gap
    for k in own[2]:
        scale = own[2][k].abs().max().clamp(min=1e-6)
        assert ((fast[2][k].float() - own[2][k].float()).abs().max() / scale) < 0.05, k
