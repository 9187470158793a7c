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
