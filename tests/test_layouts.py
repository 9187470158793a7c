"""Every batch layout (prefix sharing, packing) gives the plain path's log-probs and gradients, exactly."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import V, make_rows, run

from dpo_lightning.data.collate import PreferenceCollator, UnpairedCollator
from dpo_lightning.data.layouts import LAYOUTS, score_index
from dpo_lightning.models.tiny import build_model


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return build_model(V, seed=0, attn_implementation=request.param).float()


@pytest.fixture(scope="module")
def plain_reference(model):
    return run(model, PreferenceCollator(0)(make_rows()), full_logits=True)


@pytest.mark.parametrize("full_logits", [False, True], ids=["chunked", "model-head"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_plain_path(model, plain_reference, layout, full_logits):
    ref_lp, ref_tok, ref_g, _ = plain_reference
    batch = PreferenceCollator(0, layout=layout)(make_rows())
    lp, tok, g, out = run(model, batch, full_logits=full_logits, chunk_size=5)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(tok, ref_tok, atol=1e-5, rtol=0)
    for k in ref_g:
        assert torch.isfinite(g[k]).all(), k
        torch.testing.assert_close(g[k], ref_g[k], atol=1e-5, rtol=1e-4, msg=k)


def test_prefix_shared_layout_structure():
    batch = PreferenceCollator(0, layout="prefix_shared")([
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "index": 0},
        {"prompt_ids": [7], "chosen_ids": [9], "rejected_ids": [10, 11], "index": 1},
    ])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 9, 10, 11, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 2, 0, 0]]
    assert batch["branch_ids"].tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 2, 2, 0, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, -1, -1]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    # sources: chosen 4 <- 3 (col 2), 5 <- 4 (col 3); rejected 6 <- the last prompt token (col 2)
    assert batch["score_src"].tolist() == [2, 3, 2, 6, 6, 8]
    assert batch["score_tgt"].tolist() == [4, 5, 6, 9, 10, 11]
    assert batch["score_seq"].tolist() == [0, 0, 2, 1, 3, 3]
    assert batch["score_pos"].tolist() == [1, 2, 1, 1, 1, 2]
    assert batch["num_sequences"] == 4 and batch["index"].tolist() == [0, 1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_left_and_right_padding_give_same_values_and_no_nan(side):
    model = build_model(V, seed=0, attn_implementation="sdpa").float()
    rows = make_rows()
    plain = PreferenceCollator(0)(rows)
    ref_lp, ref_tok, ref_g, _ = run(model, plain, full_logits=True)
    batch = dict(plain)
    if side == "left":  # shift every row right by its padding; positions count from the first real token
        ids, mask, comp = plain["input_ids"], plain["attention_mask"], plain["completion_mask"]
        n_pad = (mask == 0).sum(1)
        idx = (torch.arange(ids.size(1))[None] - n_pad[:, None]) % ids.size(1)
        batch["input_ids"], batch["attention_mask"] = ids.gather(1, idx), mask.gather(1, idx)
        batch["completion_mask"] = comp.gather(1, idx)
        batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
        batch.update(score_index(batch["input_ids"], batch["completion_mask"]))
        assert (batch["attention_mask"][:, 0] == 0).any()
    for kw in ({"full_logits": True}, {"chunk_size": 4}):
        lp, tok, g, _ = run(model, batch, **kw)
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(tok, ref_tok, atol=1e-5, rtol=0)
        for k in ref_g:
            assert torch.isfinite(g[k]).all(), (side, k)
            torch.testing.assert_close(g[k], ref_g[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unpaired_kl_rows_in_every_layout(layout):
    model = build_model(V, seed=0, attn_implementation="sdpa").float()
    rows = [{"prompt_ids": r["prompt_ids"], "completion_ids": r["chosen_ids"], "label": i % 2 == 0, "index": i}
            for i, r in enumerate(make_rows())]
    ref = run(model, UnpairedCollator(0, kl_pairs=True)(rows), full_logits=True)
    got = run(model, UnpairedCollator(0, kl_pairs=True, layout=layout)(rows), chunk_size=3)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=0)
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_policy_equal_to_reference_gives_ln2_in_every_layout(tiny_path, layout):
    from dpo_lightning import PreferenceLitModule, get_loss

    module = PreferenceLitModule(str(tiny_path), loss=get_loss("sigmoid", beta=0.1))
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt_ids": torch.randint(4, 50, (p,), generator=g).tolist(),
             "chosen_ids": torch.randint(4, 50, (c,), generator=g).tolist(),
             "rejected_ids": torch.randint(4, 50, (r,), generator=g).tolist(), "index": i}
            for i, (p, c, r) in enumerate([(1, 1, 4), (6, 3, 1), (3, 5, 5)])]
    out, metrics = module.compute_loss(PreferenceCollator(0, layout=layout)(rows))
    torch.testing.assert_close(out.loss, torch.tensor(math.log(2)), atol=1e-6, rtol=0)
    assert float(metrics["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)


def test_gradient_checkpointing_is_exact(tiny_path):
    from dpo_lightning import PreferenceLitModule, get_loss

    def grads(**kw):
        torch.manual_seed(0)
        m = PreferenceLitModule(str(tiny_path), loss=get_loss("sigmoid", beta=0.1), **kw)
        with torch.no_grad():  # move the policy away from the reference so the loss has a gradient
            for p in m.policy.parameters():
                p.add_(0.01 * torch.randn_like(p))
        m.train()
        out, _ = m.compute_loss(PreferenceCollator(0, layout="prefix_shared")(
            [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12], "index": 0},
             {"prompt_ids": [13], "chosen_ids": [14, 15, 16], "rejected_ids": [17], "index": 1}]))
        out.loss.backward()
        return {k: p.grad for k, p in m.policy.named_parameters()}

    plain, ckpt = grads(), grads(gradient_checkpointing=True)
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.subprocess  # inductor compiles and loads its kernels in child processes
def test_torch_compile_matches_eager():
    from dpo_lightning.engine.logprobs import compile_backbone

    model = build_model(V, seed=0, attn_implementation="sdpa").float()
    batch = PreferenceCollator(0, layout="prefix_shared")(make_rows())
    ref_lp, ref_tok, ref_g, _ = run(model, batch)
    compile_backbone(model)
    lp, tok, g, _ = run(model, batch)
    torch.testing.assert_close(lp, ref_lp, atol=1e-4, rtol=1e-5)
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], atol=1e-4, rtol=1e-3, msg=k)


def test_datamodule_layouts_carry_the_same_sequences(tiny_path, default_data_path):
    from dpo_lightning import PreferenceDataModule

    dm = PreferenceDataModule(default_data_path, str(tiny_path), batch_size=4, max_length=64)
    dm.setup("fit")
    rows = dm.train_rows[:4]
    seqs = {}
    for layout in LAYOUTS:
        dm.layout = layout
        b = dm.collator()(rows)
        order = torch.argsort(b["score_seq"] * 10_000 + b["score_pos"])
        seqs[layout] = (b["score_seq"][order].tolist(), b["score_tgt"][order].tolist())
        assert b["num_sequences"] == 8
    assert all(v == seqs["plain"] for v in seqs.values())
    assert PreferenceDataModule(default_data_path, str(tiny_path)).layout == "prefix_shared"
    with pytest.raises(ValueError, match="data.layout"):
        PreferenceDataModule(default_data_path, str(tiny_path), layout="zigzag")
