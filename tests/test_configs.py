"""Every config option composes, binds to its target's signature, and (where offline) instantiates."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from dpo_lightning.cli.locate import compose, config_dir

CONF = config_dir()
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
NEEDS_HUB = {("model", "hf"), ("experiment", "hh_rlhf"), ("data", "hh_rlhf")}
EXTRA = {("model", "hf"): ["model.name_or_path=gpt2"]}  # a required key a user always sets


def _targets(node, path="cfg"):
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for k in node:
            if k != "hydra":
                yield from _targets(node[k], f"{path}.{k}")
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]")


def _resolve(target: str):
    mod, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError):
        owner, _, attr = mod.rpartition(".")
        return getattr(getattr(importlib.import_module(owner), attr), name)


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_binds(group, option, tmp_path):
    cfg = compose("train", [f"{group}={option}", f"paths.output_dir={tmp_path}", *EXTRA.get((group, option), [])])
    OmegaConf.resolve(cfg)
    for _path, node in _targets(cfg):
        target = _resolve(node._target_)
        kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
        sig = inspect.signature(target)
        extra = {"PreferenceDataModule": {"tokenizer": None}}.get(getattr(target, "__name__", ""), {})
        if node.get("_partial_"):
            sig.bind_partial(**kwargs)
        else:
            sig.bind(**kwargs, **extra) if extra else sig.bind_partial(**kwargs)


OFFLINE = [(g, o) for g, o in OPTIONS if (g, o) not in NEEDS_HUB and g in
           {"loss", "optimizer", "scheduler", "logger", "callbacks", "reference", "data", "debug", "model"}]


@pytest.mark.parametrize("group, option", OFFLINE, ids=[f"{g}={o}" for g, o in OFFLINE])
def test_option_instantiates_offline(group, option, tmp_path, monkeypatch):
    from dpo_lightning.train import build

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose("train", [f"{group}={option}", f"paths.output_dir={tmp_path}"])
    objs = build(cfg)
    assert objs["module"].loss_fn.name == cfg.loss.name
    assert objs["trainer"] is not None


def test_every_yaml_key_has_a_comment():
    missing = []
    for f in sorted(CONF.rglob("*.yaml")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            s = line.strip()
            if not s or s.startswith(("#", "-", "defaults:")) or "_target_" in s or s.startswith("name:") and \
                    f.parent.name == "loss":
                continue
            m = re.match(r"^([\w.]+):\s*(.*)$", s)
            if m and m.group(2) and not m.group(2).startswith("#") and "#" not in m.group(2):
                missing.append(f"{f.relative_to(CONF)}:{i}: {s}")
    assert not missing, "keys without a comment:\n" + "\n".join(missing)


def test_unknown_group_option_is_reported():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="loss/nope"):
        compose("train", ["loss=nope"])


def test_eval_config_composes():
    cfg = compose("eval", ["paths.output_dir=/tmp/x"])
    assert cfg.output_json == "/tmp/x/eval.json" and cfg.loss.name == "sigmoid"


TINY_PRESET = {"optimizer.lr": 1.0e-3, "trainer.max_steps": 300, "trainer.val_check_interval": 100,
               "generation.max_new_tokens": 24}


def _preset_values(cfg) -> dict:
    return {k: OmegaConf.select(cfg, k) for k in TINY_PRESET}


def test_default_composes_exactly_the_tiny_preset():
    """`dpo-train` with no arguments: the tiny model and the tiny preset's training settings (experiment/tiny.yaml)."""
    cfg = compose("train", ["paths.output_dir=/tmp/x"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices["experiment"] == "tiny" and cfg.model.name_or_path == "builtin:tiny-llama"
    assert _preset_values(cfg) == TINY_PRESET
    preset = OmegaConf.load(CONF / "experiment" / "tiny.yaml")
    assert {k: OmegaConf.select(preset, k) for k in TINY_PRESET} == TINY_PRESET  # the values live there, only there
    model = OmegaConf.load(CONF / "model" / "tiny.yaml")
    assert "optimizer" not in model and "trainer" not in model and "generation" not in model


def test_model_hf_does_not_carry_the_tiny_preset():
    """A model group picks a model only: model=hf gets the groups' own defaults, not the tiny model's lr/max_steps."""
    cfg = compose("train", ["model=hf", "model.name_or_path=x", "paths.output_dir=/tmp/x"])
    defaults = {k: OmegaConf.select(compose("train", ["~experiment", "paths.output_dir=/tmp/x"]), k)
                for k in TINY_PRESET}
    assert _preset_values(cfg) == defaults
    assert cfg.optimizer.lr == 5.0e-7 and cfg.trainer.max_steps == 1000
    assert cfg.model.name_or_path == "x" and cfg.model.dtype == "bfloat16"


def test_tiny_ipo_is_the_tiny_preset_with_ipo():
    base, ipo = (compose("train", [*o, "paths.output_dir=/tmp/x"]) for o in ([], ["experiment=tiny_ipo"]))
    assert _preset_values(ipo) == TINY_PRESET and ipo.loss.name == "ipo"
    assert OmegaConf.to_container(ipo.model) == OmegaConf.to_container(base.model)
