"""Determinism: the same seed gives the same trajectory (losses and weights, bit for bit), and gradient accumulation
does not change the optimizer step of a paired loss: 8 pairs x 1 = 4 x 2 = 2 x 4 in loss and gradients (fp32),
including the NLL token means of SFT / CPO / ORPO / RPO / MPO (``data/accumulation.py``)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from dpo_lightning import LOSSES, PreferenceDataModule, PreferenceLitModule, get_loss
from dpo_lightning.data.accumulation import with_step_tokens

# Batch-coupled by definition, left out: AOT sorts the log-ratios of the whole batch (an optimal-transport match
# between the batch's chosen and rejected rewards); beta-DPO sets beta from the batch's reward-gap statistics and
# filters pairs by them (Wu et al. 2024, Sec. 4).
BATCH_COUPLED = {"aot", "aot_unpaired", "beta_dpo"}
PAIRED = sorted(n for n, spec in LOSSES.items() if spec.paired and n not in BATCH_COUPLED)


@pytest.fixture(scope="module")
def setup(tiny_path, default_data_path):
    torch.set_num_threads(1)
    dm = PreferenceDataModule(default_data_path, str(tiny_path), batch_size=8, max_length=32, paired=True)
    dm.setup("fit")
    torch.manual_seed(0)
    module = PreferenceLitModule(str(tiny_path), loss="sigmoid")
    with torch.no_grad():  # a policy that differs from its reference: non-zero rewards and margins
        for p in module.policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    state = {k: v.clone() for k, v in module.policy.state_dict().items()}
    return module, state, dm.collator(), dm.train_rows[:8]


def _step(module, state, collate, rows, k):
    """What Lightning does for one optimizer step over `rows` in k micro-batches: loss / k, backward each."""
    module.policy.load_state_dict(state)
    module.policy.zero_grad(set_to_none=True)
    module.loss_state.clear()
    micro = [collate(rows[j * len(rows) // k:(j + 1) * len(rows) // k]) for j in range(k)]
    total = 0.0
    for batch in with_step_tokens(iter(micro), k):
        out, _ = module.compute_loss(batch)
        (out.loss / k).backward()
        total += out.loss.item() / k
    return total, [p.grad.clone() for p in module.policy.parameters()]


@pytest.mark.parametrize("name", PAIRED)
def test_accumulation_invariance_of_paired_losses(setup, name):
    module, state, collate, rows = setup
    module.loss_fn = get_loss(name, losses=["sigmoid", "sft"]) if name == "combination" else get_loss(name)
    (l1, g1), (l2, g2), (l4, g4) = (_step(module, state, collate, rows, k) for k in (1, 2, 4))
    scale = max(g.abs().max().item() for g in g1)
    assert l2 == pytest.approx(l1, abs=1e-5) and l4 == pytest.approx(l1, abs=1e-5)
    for a, b, c in zip(g1, g2, g4):
        torch.testing.assert_close(b, a, atol=1e-5 * max(scale, 1), rtol=1e-4)
        torch.testing.assert_close(c, a, atol=1e-5 * max(scale, 1), rtol=1e-4)


def _fit(tiny_path, data, *, seed, batch_size=8, accumulate=1, steps=2, loss="cpo"):
    L.seed_everything(seed)
    module = PreferenceLitModule(str(tiny_path), loss=get_loss(loss), optimizer={"name": "SGD", "lr": 0.5},
                                 scheduler={"name": "constant", "warmup_ratio": 0.0})
    dm = PreferenceDataModule(data, str(tiny_path), batch_size=batch_size, max_length=32, seed=seed,
                              group_by_length=False)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()], limit_val_batches=0,
              gradient_clip_val=None).fit(module, datamodule=dm)
    return losses, {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


def test_same_seed_same_trajectory(tiny_path, default_data_path):
    a_losses, a = _fit(tiny_path, default_data_path, seed=5, steps=3, loss="sigmoid")
    b_losses, b = _fit(tiny_path, default_data_path, seed=5, steps=3, loss="sigmoid")
    c_losses, _ = _fit(tiny_path, default_data_path, seed=6, steps=3, loss="sigmoid")
    assert a_losses == b_losses and all(torch.equal(a[k], b[k]) for k in a)
    assert c_losses != a_losses  # the seed does change the data order


def test_trainer_accumulation_gives_the_same_weights(tiny_path, default_data_path):
    """Through Lightning: 2 optimizer steps of 8 pairs as 8 x 1, 4 x 2 and 2 x 4 (CPO: DPO-style term + NLL)."""
    ref_losses, ref = _fit(tiny_path, default_data_path, seed=1)
    for batch_size, k in ((4, 2), (2, 4)):
        _, got = _fit(tiny_path, default_data_path, seed=1, batch_size=batch_size, accumulate=k)
        moved = max((ref[n] - got[n]).abs().max().item() for n in ref)
        assert moved < 1e-5, (batch_size, k, moved)
