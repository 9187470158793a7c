"""PreferenceLitModule: log-probs, the DPO loss, the reference, training and checkpoints."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from dpo_lightning import ModelSpec, PreferenceDataModule, PreferenceLitModule, get_loss
from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.engine.logprobs import sequence_logps
from dpo_lightning.losses.registry import LossInputs

ROWS = [
    {"index": 0, "prompt_ids": [162, 21, 84, 10, 27, 21], "chosen_ids": [81, 4, 3], "rejected_ids": [78, 28, 10, 3]},
    {"index": 1, "prompt_ids": [162, 21, 84], "chosen_ids": [81, 3], "rejected_ids": [78, 28, 10, 10, 3]},
    {"index": 2, "prompt_ids": [27], "chosen_ids": [4], "rejected_ids": [10]},  # 1-token prompt and completions
]


@pytest.fixture()
def module(tiny_path):
    torch.manual_seed(0)
    return PreferenceLitModule(ModelSpec(str(tiny_path)), loss=get_loss("sigmoid", beta=0.1))


def direct_logps(model, rows):
    """Reference computation: each sequence alone, full logits, log_softmax, gather, sum over completion."""
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        for r in rows:
            ids = torch.tensor([r["prompt_ids"] + r[key]])
            logits = model(input_ids=ids).logits.float()[0, :-1]
            lp = logits.log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
            out.append(lp[len(r["prompt_ids"]) - 1:].sum())
    order = list(range(len(rows)))  # chosen of all rows, then rejected of all rows
    return torch.stack([out[i] for i in order] + [out[len(rows) + i] for i in order])


@pytest.mark.parametrize("full_logits", [False, True])
def test_sequence_logps_match_direct_computation(module, full_logits):
    batch = PreferenceCollator(pad_token_id=0)(ROWS)
    got = sequence_logps(module.policy, batch, batch["num_sequences"], chunk_size=3, full_logits=full_logits)
    want = direct_logps(module.policy, ROWS)
    torch.testing.assert_close(got.logps, want, atol=1e-5, rtol=0)
    assert got.lengths.tolist() == [3, 2, 1, 4, 5, 1]
    g_got = torch.autograd.grad(got.logps.sum(), list(module.policy.parameters()), allow_unused=True)
    g_want = torch.autograd.grad(want.sum(), list(module.policy.parameters()), allow_unused=True)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_dpo_loss_hand_derived():
    """beta=0.5; log-ratios chosen = -1 - (-2) = 1, rejected = -3 - (-1) = -2, delta = 3.
    loss = -log sigmoid(1.5) = log(1 + e^-1.5) = 0.20141327; rewards = 0.5, -1.0.
    cDPO eps=0.1: 0.9 * log(1 + e^-1.5) + 0.1 * log(1 + e^1.5) = 0.18127195 + 0.17014133 = 0.35141327."""
    x = LossInputs(chosen_logps=torch.tensor([-1.0]), rejected_logps=torch.tensor([-3.0]),
                   ref_chosen_logps=torch.tensor([-2.0]), ref_rejected_logps=torch.tensor([-1.0]))
    out = get_loss("sigmoid", beta=0.5)(x)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-7)
    assert out.chosen_rewards.tolist() == [0.5] and out.rejected_rewards.tolist() == [-1.0]
    smoothed = get_loss("sigmoid", beta=0.5, label_smoothing=0.1)(x)
    assert smoothed.loss.item() == pytest.approx(0.35141327, abs=1e-6)


def test_policy_equal_reference_gives_ln2_and_zero_rewards(module):
    _, metrics = module.compute_loss(PreferenceCollator(pad_token_id=0)(ROWS))
    assert metrics["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/chosen"].item() == 0 and metrics["rewards/margins"].item() == 0


def test_reference_is_frozen_and_not_checkpointed(module, tmp_path):
    assert not any(p.requires_grad for p in module.reference.parameters())
    module.train()
    assert module.policy.training and not module.reference.training
    assert all(not isinstance(m, torch.nn.Dropout) or m.p == 0 for m in module.policy.modules())
    state = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(state)
    assert state["state_dict"] and not any(k.startswith("reference.") for k in state["state_dict"])


def test_three_steps_move_every_policy_param_and_no_reference_param(module, default_data_path):
    """TRL's three-beat test: snapshot, train, assert changed."""
    module.optimizer_spec.lr = 1e-2
    policy0 = {k: v.clone() for k, v in module.policy.named_parameters()}
    ref0 = {k: v.clone() for k, v in module.reference.named_parameters()}
    dm = PreferenceDataModule(default_data_path, module.model_spec, batch_size=4, max_length=64)
    L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, datamodule=dm)
    for k, v in module.policy.named_parameters():
        assert not torch.equal(v, policy0[k]), f"policy parameter {k} did not change"
    for k, v in module.reference.named_parameters():
        assert torch.equal(v, ref0[k]), f"reference parameter {k} changed"


def test_resume_from_checkpoint_continues(module, default_data_path, tmp_path):
    module.optimizer_spec.lr = 1e-3
    dm = PreferenceDataModule(default_data_path, module.model_spec, batch_size=4, max_length=64)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1,
                                               filename="s{step}", auto_insert_metric_name=False)
    L.Trainer(max_steps=4, logger=False, callbacks=[ckpt], enable_progress_bar=False,
              enable_model_summary=False).fit(module, datamodule=dm)
    at_2 = torch.load(tmp_path / "s2.ckpt", weights_only=False)["state_dict"]
    fresh = PreferenceLitModule(module.model_spec, loss=get_loss("sigmoid", beta=0.1), optimizer={"lr": 1e-3})
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(fresh, datamodule=dm, ckpt_path=str(tmp_path / "s2.ckpt"))
    assert trainer.global_step == 4
    # the resumed policy started from the step-2 weights and moved on; the reference is the initial model
    assert all(not torch.equal(v, at_2[f"policy.{k}"]) for k, v in fresh.policy.named_parameters())
    for k, v in fresh.reference.state_dict().items():
        torch.testing.assert_close(v, module.reference.state_dict()[k])


def test_unknown_loss_and_hparam_are_rejected():
    with pytest.raises(KeyError, match="unknown loss 'dpoo'"):
        get_loss("dpoo")
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        get_loss("sigmoid", betta=0.1)


def test_logsigmoid_identity():  # guards the loss's numerics for large margins
    assert torch.isfinite(F.logsigmoid(torch.tensor([-1e4, 1e4]))).all()


def test_kto_loaders_never_yield_a_single_row_batch(default_data_path, tiny_path):
    """KTO's KL estimate needs two rows: rows travel in units of at least two (data/units.py)."""
    dm = PreferenceDataModule(default_data_path, str(tiny_path), batch_size=3, max_length=64, paired=False,
                              kl_pairs=True, val_fraction=0.1)
    dm.setup("fit")
    n_val = len(dm.val_rows)
    dm.eval_batch_size = n_val - 1 if n_val % 2 else n_val // 2 + 1  # forces a would-be single trailing row
    val_sizes = [b["index"].numel() for b in dm.val_dataloader()]
    assert min(val_sizes) >= 2 and sum(val_sizes) == n_val
    assert min(b["index"].numel() for b in dm.train_dataloader()) >= 2


def test_unpaired_loss_scores_accuracy_on_pairs_split_into_rows(default_data_path, tiny_path):
    """KTO trains on pairs split into rows; validation still reports reward accuracy on whole pairs."""
    torch.manual_seed(0)
    m = PreferenceLitModule(str(tiny_path), loss=get_loss("kto", beta=0.1), optimizer={"lr": 1e-3})
    dm = PreferenceDataModule(default_data_path, str(tiny_path), batch_size=8, max_length=64, paired=False,
                              kl_pairs=True, val_fraction=0.1)
    dm.setup("fit")
    pairs = lambda rows: {r["index"] // 2 for r in rows}  # noqa: E731
    assert not pairs(dm.train_rows) & pairs(dm.val_rows)  # whole pairs are held out
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    before = trainer.validate(m, datamodule=dm, verbose=False)[0]
    trainer.fit(m, datamodule=dm)
    after = trainer.validate(m, datamodule=dm, verbose=False)[0]
    assert before["val/rewards/accuracies"] == 0.0 and after["val/rewards/accuracies"] > 0.6
