"""The architecture matrix: on every family of ``arch_families.py`` (tiny, random weights, sliding windows
shorter than the rows, softcapping and logit scaling on), every layout of the fast engine gives the model's own
numbers: per-token log-probs and parameter gradients of the plain path (the model's own forward, full logits)."""

from __future__ import annotations

import pytest
import torch
from arch_families import FAMILIES, build
from helpers import V, make_rows, run

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.data.layouts import LAYOUTS
from dpo_lightning.engine.logprobs import sequence_logps
from dpo_lightning.models.quirks import EnginePlan, HeadRule, engine_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same(got, ref, msg):
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5, msg=f"{msg}: sequence log-probs")
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5, msg=f"{msg}: token log-probs")
    for k in ref[2]:
        assert torch.isfinite(got[2][k]).all(), (msg, k)
        torch.testing.assert_close(got[2][k], ref[2][k], atol=1e-5, rtol=1e-4, msg=f"{msg}: grad {k}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_layout_gives_the_models_own_numbers(family):
    model = build(family, V)
    rows = make_rows()
    ref = run(model, PreferenceCollator(0)(rows), full_logits=True)  # the model's own forward, plain rows
    for layout in LAYOUTS:
        batch = PreferenceCollator(0, layout=layout)(rows)
        assert_same(run(model, batch, chunk_size=5), ref, f"{family}/{layout}/chunked head")
    batch = PreferenceCollator(0, layout="prefix_shared")(rows)
    assert_same(run(model, batch, full_logits=True), ref, f"{family}/prefix_shared/model head")


@pytest.mark.parametrize("family,naive", [
    ("mistral", {"windows": {"full_attention": None}}),  # the old engine: one full-attention tree mask
    ("qwen2", {"windows": {"full_attention": None}, "dict_masks": False}),
    ("gemma2", {"head": HeadRule()}),  # the old engine knew softcapping; without it: wrong
    ("granite", {"head": HeadRule()}),
    ("cohere", {"head": HeadRule()}),
])
def test_without_the_quirk_the_numbers_differ(family, naive):
    """The matrix can fail: dropping one quirk from the plan moves the log-probs far beyond tolerance."""
    model = build(family, V)
    rows = make_rows()
    ref = run(model, PreferenceCollator(0)(rows), full_logits=True)
    plan = engine_plan(model)
    wrong = EnginePlan(**{**plan.__dict__, **naive})
    got = run(model, PreferenceCollator(0, layout="prefix_shared")(rows), plan=wrong)
    assert (got[1] - ref[1]).abs().max() > 1e-3


def test_static_plan_of_each_family():
    plans = {name: engine_plan(build(name, V)) for name in ("mistral", "qwen2", "gemma2", "granite", "cohere",
                                                            "mixtral", "bloom")}
    assert plans["mistral"].windows == {"sliding_attention": 5} and not plans["mistral"].dict_masks
    assert plans["qwen2"].windows == {"sliding_attention": 5, "full_attention": None} and plans["qwen2"].dict_masks
    assert plans["gemma2"].head == HeadRule(softcap=2.0)
    assert plans["granite"].head == HeadRule(scale=0.25) and plans["cohere"].head == HeadRule(scale=0.25)
    assert plans["mixtral"].aux["coef"] == 0.05 and plans["mistral"].aux is None
    assert plans["bloom"].layouts == {"plain"} and "position_ids" in plans["bloom"].layout_note


@pytest.mark.parametrize("layout", ["plain", "packed_unshared", "prefix_shared"])
def test_moe_router_loss_is_the_models_own(layout):
    """Mixtral: the aux loss and the gradient of logps + coef * aux match the model's own forward."""
    model = build("mixtral", V)
    rows = make_rows()
    coef = engine_plan(model).aux["coef"]

    def loss_and_grads(batch, own: bool):
        model.zero_grad(set_to_none=True)
        if own:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_router_logits=True)
            logits = out.logits.float().reshape(-1, V)[batch["score_src"]]
            tok = logits.log_softmax(-1).gather(1, batch["score_tgt"][:, None]).squeeze(1)
            aux = out.aux_loss
        else:
            out = sequence_logps(model, batch, batch["num_sequences"], aux_loss=True, chunk_size=4)
            tok, aux = out.token_logps, out.aux_loss
        (tok.sum() + coef * aux).backward()
        return aux.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ref_aux, ref_g = loss_and_grads(PreferenceCollator(0)(rows), own=True)
    aux, g = loss_and_grads(PreferenceCollator(0, layout=layout)(rows), own=False)
    torch.testing.assert_close(aux, ref_aux, atol=1e-6, rtol=1e-5)
    assert ref_aux > 0 and ref_g.keys() == g.keys()
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], atol=1e-5, rtol=1e-4, msg=k)
