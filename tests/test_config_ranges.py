"""Hyperparameter ranges and impossible combinations: bad values are refused when the config is
composed (``validate_config``, before any model loads), with the key and its valid range in the message."""

from __future__ import annotations

import pytest

from dpo_lightning.cli.locate import compose
from dpo_lightning.config.validate import ConfigError, validate_config


def _cfg(tmp_path, *overrides: str, name: str = "train"):
    return compose(name, [f"paths.output_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["loss.beta=0"], "loss.beta=0"),
    (["loss.beta=-0.1"], "loss.beta=-0.1"),
    (["loss.label_smoothing=0.5"], "loss.label_smoothing=0.5"),
    (["loss=simpo", "loss.gamma=-1"], "loss.gamma=-1"),
    (["loss=cpo", "loss.cpo_alpha=-0.5"], "loss.cpo_alpha=-0.5"),
    (["loss=rpo", "loss.rpo_alpha=-1"], "loss.rpo_alpha=-1"),
    (["loss=kto", "loss.desirable_weight=0"], "loss.desirable_weight=0"),
    (["loss=discopop", "loss.discopop_tau=0"], "loss.discopop_tau=0"),
    (["loss=alphapo", "loss.alpha=.inf"], "loss.alpha=.inf: must be a number"),
    (["loss.f_divergence_type=alpha_divergence", "loss.f_alpha_divergence_coef=1.5"], "loss.f_alpha_divergence_coef=1.5"),
    (["loss.ld_alpha=1.5"], "loss.ld_alpha=1.5"),
    (["loss=combination", "loss.losses=[sigmoid,sft]", "loss.weights=[1.0,-1.0]"], "loss.weights"),
    (["optimizer.lr=0"], "optimizer.lr=0"),
    (["optimizer.lr=-1e-5"], "optimizer.lr=-1e-05"),
    (["optimizer.weight_decay=-0.01"], "optimizer.weight_decay=-0.01"),
    (["scheduler.warmup_ratio=1.5"], "scheduler.warmup_ratio=1.5"),
    (["scheduler.warmup_steps=-3"], "scheduler.warmup_steps=-3"),
    (["scheduler.min_lr_ratio=2"], "scheduler.min_lr_ratio=2"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1"),
    (["data.batch_size=0"], "data.batch_size=0"),
])
def test_out_of_range_hyperparameters_are_refused_at_compose_time(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg(tmp_path, *overrides))
    assert message in str(err.value)
    assert any(s in str(err.value) for s in ("(", "[", ">")), "the valid range is named"


def test_valid_hyperparameters_pass(tmp_path):
    for overrides in ([], ["loss=kto"], ["loss=simpo", "loss.gamma=0"], ["loss=alphapo", "loss.alpha=-0.5"],
                      ["loss.label_smoothing=0.3", "optimizer.lr=1e-6", "scheduler.warmup_ratio=0"]):
        validate_config(_cfg(tmp_path, *overrides))


def test_every_registered_hyperparameter_has_a_range():
    from dpo_lightning.losses.registry import LOSSES, NOT_NUMERIC, get_loss

    get_loss("sigmoid")  # registers every family
    for name, spec in LOSSES.items():
        missing = sorted((spec.keywords | set(spec.modifiers)) - set(spec.ranges) - NOT_NUMERIC)
        assert not missing, f"loss {name!r}: no valid range for {missing}"


@pytest.mark.parametrize("overrides, message", [
    (["model.attn_implementation=flash_attention_2", "data.layout=prefix_shared"], "data.layout=prefix_shared"),
    (["model.attn_implementation=flash_attention_2", "data.layout=packed"], "data.layout=packed"),
    (["reference.mode=none"], "reference.mode=none"),
    (["loss=kto", "reference.precompute=true"], "reference.precompute"),
    (["peft=lora", "reference.dtype=bfloat16"], "reference.dtype"),
])
def test_checks_that_ran_after_the_model_loaded_run_at_compose_time(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg(tmp_path, *overrides))
    assert message in str(err.value)


def test_combinations_that_do_work_pass(tmp_path):
    for overrides in (["model.attn_implementation=flash_attention_2", "data.layout=packed_unshared"],
                      ["loss=orpo", "reference.mode=none"], ["loss=apo_zero_unpaired", "reference.precompute=true"],
                      ["peft=lora", "reference.dtype=bfloat16", "reference.mode=copy"],
                      ["peft=lora", "reference.dtype=bfloat16", "reference.precompute=true"]):
        validate_config(_cfg(tmp_path, *overrides))


@pytest.mark.parametrize("override, message", [("data.max_length=1", "data.max_length=1: must be at least 2"),
                                               ("data.max_prompt_length=0", "data.max_prompt_length=0: must be at")])
def test_truncation_lengths_are_refused_when_composed(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_cfg(tmp_path, override))


def test_a_value_a_settings_object_refuses_is_a_config_error(tmp_path):
    """The constructors' own refusals take the one clean path too (dpo-train prints ``error: ...``, exit 2)."""
    from dpo_lightning.cli.build import build_module

    with pytest.raises(ConfigError, match="data.truncation_mode='sideways': use 'keep_start' or 'keep_end'"):
        build_module(_cfg(tmp_path, "data.truncation_mode=sideways"))
