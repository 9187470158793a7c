"""TR-DPO reference sync: after a sync the reference's log-probs equal those of a model built with the mixed
weights (full fine-tuning and LoRA's mixed "reference" adapter), a checkpoint restores the moved reference,
invalid combinations are refused."""

from __future__ import annotations

import pytest
import torch

from dpo_lightning import PreferenceLitModule
from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.engine.logprobs import sequence_logps
from dpo_lightning.models.hf import ModelSpec, load_causal_lm
from dpo_lightning.models.peft import apply_peft
from dpo_lightning.reference.sync import ReferenceSync, sync_reference

LORA = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def batch(tokenizer):
    rows = [{"prompt_ids": tokenizer(p)["input_ids"], "chosen_ids": tokenizer(c)["input_ids"] + [3],
             "rejected_ids": tokenizer(r)["input_ids"] + [3], "index": i}
            for i, (p, c, r) in enumerate([("user : hi assistant :", " hello !", " go away ."),
                                           ("user : describe the apple . assistant :", " the apple is lovely .",
                                            " no .")])]
    return PreferenceCollator(tokenizer.pad_token_id, layout="prefix_shared")(rows)


def _move(params, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _plain_logps(model, batch):
    with torch.no_grad():
        return sequence_logps(model.eval(), batch, batch["num_sequences"], full_logits=True).logps


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_full_finetuning_sync_equals_a_model_with_the_mixed_weights(tiny_path, batch, alpha):
    torch.set_num_threads(1)
    m = PreferenceLitModule(str(tiny_path), reference={"sync": {"alpha": alpha, "every_n_steps": 2}})
    assert [type(c) for c in m.configure_callbacks()] == [ReferenceSync]
    _move(m.policy.parameters())  # as training would
    pol = {k: v.clone() for k, v in m.policy.state_dict().items()}
    ref = {k: v.clone() for k, v in m.reference.state_dict().items()}
    assert sync_reference(m.reference, alpha) == len(list(m.policy.parameters())) and m.reference.version == 1
    mixed = {k: (pol[k] if alpha == 1.0 else ref[k] * (1 - alpha) + pol[k] * alpha) for k in pol}
    fresh = load_causal_lm(ModelSpec(str(tiny_path)))
    fresh.load_state_dict(mixed)
    want = _plain_logps(fresh, batch)
    torch.testing.assert_close(m.reference_logps(batch).logps, want, atol=1e-5, rtol=0)
    assert not torch.allclose(want, _plain_logps(load_causal_lm(ModelSpec(str(tiny_path))), batch))
    if alpha == 1.0:  # hard update: the reference is the policy, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(m.reference.parameters(), m.policy.parameters()))


def test_lora_sync_mixes_a_reference_adapter_not_the_base(tiny_path, batch):
    torch.set_num_threads(1)
    alpha = 0.5
    m = PreferenceLitModule(str(tiny_path), peft=LORA, reference={"sync": {"alpha": alpha, "every_n_steps": 1}})
    assert m.reference.mode == "adapter" and m.reference.module is None and m.reference.adapter == "reference"
    trainable = {n for n, p in m.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)  # the reference adapter never trains
    base = _plain_logps(load_causal_lm(ModelSpec(str(tiny_path))), batch)
    _move([p for p in m.policy.parameters() if p.requires_grad], scale=0.2)
    torch.testing.assert_close(m.reference_logps(batch).logps, base, atol=1e-5, rtol=0)  # still the base
    adapter = {n: p.detach().clone() for n, p in m.policy.named_parameters() if ".default." in n}
    ref_adapter = {n: p.detach().clone() for n, p in m.policy.named_parameters() if ".reference." in n}
    sync_reference(m.reference, alpha)
    fresh = apply_peft(load_causal_lm(ModelSpec(str(tiny_path))), LORA)
    params = dict(fresh.named_parameters())
    with torch.no_grad():
        for n, p in adapter.items():
            params[n].copy_(ref_adapter[n.replace(".default.", ".reference.")] * (1 - alpha) + p * alpha)
    want = _plain_logps(fresh, batch)
    torch.testing.assert_close(m.reference_logps(batch).logps, want, atol=1e-5, rtol=0)
    assert not torch.allclose(want, base, atol=1e-4)
    assert {n for n, p in m.policy.named_parameters() if p.requires_grad} == trainable


def test_invalid_sync_settings_are_refused(tiny_path):
    from dpo_lightning.cli.locate import compose
    from dpo_lightning.config.validate import ConfigError, validate_config

    with pytest.raises(ConfigError, match="reference.precompute=true"):
        validate_config(compose("train", ["reference.sync.every_n_steps=4", "reference.precompute=true",
                                          "paths.output_dir=/tmp/x"]))
    with pytest.raises(ConfigError, match=r"reference.sync.alpha=0.0: must be in \(0, 1\]"):
        validate_config(compose("train", ["reference.sync.every_n_steps=4", "reference.sync.alpha=0",
                                          "paths.output_dir=/tmp/x"]))
    validate_config(compose("train", ["reference.precompute=true", "paths.output_dir=/tmp/x"]))  # sync off: fine
    with pytest.raises(ValueError, match="the loss uses no reference"):
        PreferenceLitModule(str(tiny_path), loss="simpo", reference={"sync": {"every_n_steps": 2}})


class _Capture:
    """Records the reference's weights when training starts (after a checkpoint was restored)."""

    def __new__(cls):
        import lightning as L

        class Capture(L.Callback):
            def on_train_start(self, trainer, pl_module):
                self.state = {k: v.clone() for k, v in pl_module.state_dict().items()
                              if k.startswith("reference.") or ".reference." in k}
        return Capture()


@pytest.mark.parametrize("peft", [None, LORA], ids=["full", "lora"])
def test_checkpoint_restores_the_moved_reference(tiny_path, default_data_path, tmp_path, peft):
    import lightning as L

    from dpo_lightning import PreferenceDataModule

    torch.set_num_threads(1)

    def fit(max_steps, ckpt=None):
        L.seed_everything(0)
        dm = PreferenceDataModule(default_data_path, tokenizer=str(tiny_path), batch_size=4, max_length=32,
                                  cache_dir=str(tmp_path / "cache"))
        m = PreferenceLitModule(str(tiny_path), peft=peft, optimizer={"lr": 5e-2},
                                reference={"sync": {"alpha": 0.5, "every_n_steps": 2}})
        cap = _Capture()
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, callbacks=[cap],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0)
        trainer.fit(m, datamodule=dm, ckpt_path=ckpt)
        return trainer, m, cap

    trainer, m, cap = fit(2)
    assert m.reference.version == 1
    moved = {k: v.clone() for k, v in m.state_dict().items() if k in cap.state}
    assert moved and any(not torch.equal(moved[k], cap.state[k]) for k in moved)  # the sync moved it
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert all(k in saved["state_dict"] for k in moved)
    trainer, m2, cap2 = fit(3, tmp_path / "last.ckpt")
    assert cap2.state.keys() == moved.keys()
    for k in moved:  # restored as moved, not rebuilt from the source
        torch.testing.assert_close(cap2.state[k], moved[k], atol=0, rtol=0)
    assert m2.reference.version == 1 and trainer.global_step == 3  # no second sync at the resumed step
