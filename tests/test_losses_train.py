"""Every registry entry trains the tiny built-in model for two steps: finite loss, every trainable policy
parameter moves, and reference-free losses never build or run a reference."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

import dpo_lightning.reference.reference as reference_mod
import dpo_lightning.training.module as module_mod
from dpo_lightning import ModelSpec, PreferenceDataModule, PreferenceLitModule, get_loss
from dpo_lightning.losses import LOSSES

# a registry entry that cannot be built without arguments gets them here
ARGS = {"combination": {"losses": [{"name": "sigmoid", "weight": 1.0}, {"name": "sft", "weight": 0.5}]}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from intra-op threads; one thread avoids thrashing on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def datamodules(default_data_path, tiny_path):
    """One data module per (paired, kl_pairs) kind, set up once for the whole module."""
    cache: dict = {}

    def get(paired: bool, kl_pairs: bool) -> PreferenceDataModule:
        if (paired, kl_pairs) not in cache:
            dm = PreferenceDataModule(default_data_path, ModelSpec(str(tiny_path)), batch_size=4, max_length=64,
                                      paired=paired, kl_pairs=kl_pairs)
            dm.setup("fit")
            cache[(paired, kl_pairs)] = dm
        return cache[(paired, kl_pairs)]

    return get


def _trainer() -> L.Trainer:
    return L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu")


CASES = [(n, ARGS.get(n, {})) for n in sorted(LOSSES)] + [
    ("sigmoid", {"use_weighting": True, "ld_alpha": 0.5}),  # WPO + LD-DPO modifiers
    ("ipo", {"f_divergence_type": "js_divergence"}),
    ("mpo", {"use_weighting": True}),
]


@pytest.mark.parametrize("name,hparams", CASES, ids=[n + ("+" + "+".join(h) if n not in ARGS and h else "")
                                                      for n, h in CASES])
def test_two_steps_move_every_parameter(name, hparams, datamodules, tiny_path, monkeypatch):
    torch.manual_seed(0)
    loss = get_loss(name, **hparams)
    module = PreferenceLitModule(ModelSpec(str(tiny_path)), loss=loss, optimizer={"lr": 1e-2})
    calls: list[torch.nn.Module] = []
    real = module_mod.sequence_logps

    def counting(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(module_mod, "sequence_logps", counting)  # the policy's forward
    monkeypatch.setattr(reference_mod, "sequence_logps", counting)  # the reference's
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    before = {k: p.detach().clone() for k, p in module.policy.named_parameters() if p.requires_grad}
    trainer = _trainer()
    trainer.callbacks.append(Record())
    trainer.fit(module, datamodule=datamodules(loss.paired, loss.needs_kl_pairs))
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    unmoved = [k for k, p in module.policy.named_parameters() if p.requires_grad and torch.equal(p, before[k])]
    assert not unmoved, f"{name}: parameters did not move: {unmoved}"
    if not loss.requires_reference:
        assert module.reference.module is None and module.reference.mode == "none"
        assert len(calls) == 2 and all(m is module.policy for m in calls), "a reference forward ran"
    else:
        assert len(calls) == 4  # policy + reference, two steps


@pytest.mark.parametrize("batch_size", [3, 5])
def test_kto_trains_with_odd_batch_sizes(batch_size, default_data_path, tiny_path):
    """Paired data split into unpaired rows, mismatched KL rows built per batch, odd batch sizes (rounded up to
    whole pairs: a pair's two rows share a batch, ``data/units.py``)."""
    loss = get_loss("kto")
    dm = PreferenceDataModule(default_data_path, ModelSpec(str(tiny_path)), batch_size=batch_size, max_length=64,
                              paired=loss.paired, kl_pairs=loss.needs_kl_pairs)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    rows = batch_size + 1  # whole pairs
    assert batch["index"].numel() == rows and batch["num_sequences"] == 2 * rows  # rows + their KL rows
    module = PreferenceLitModule(ModelSpec(str(tiny_path)), loss=loss, optimizer={"lr": 1e-2})
    out, metrics = module.compute_loss(batch)
    assert out.losses.shape == (rows,) and torch.isfinite(out.loss) and "kl" in metrics
    trainer = _trainer()
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
