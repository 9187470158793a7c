"""The loss registry as a whole: every entry documented, picklable, with a Hydra YAML equal to ``get_loss``,
and a sweep over losses that composes."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from dpo_lightning.losses import LOSSES, Loss, get_loss

CONF = Path(__file__).resolve().parents[1] / "conf" / "loss"


def _build(name: str) -> Loss:
    return get_loss(name, **({"losses": ["sigmoid", "sft"]} if name == "combination" else {}))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_entry_is_documented_and_picklable(name):
    spec = LOSSES[name]
    assert spec.fn.__doc__ and spec.paper and ("arXiv" in spec.paper or name in ("combination", "sft"))
    loss = _build(name)
    assert pickle.loads(pickle.dumps(loss)) == loss
    assert isinstance(loss.requires_reference, bool) and isinstance(loss.needs_kl_pairs, bool)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_entry_has_a_yaml_equal_to_get_loss(name):
    """conf/loss/<name>.yaml instantiates (as Hydra does) to exactly get_loss(name) with defaults; every key
    carries a comment."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = CONF / f"{name}.yaml"
    assert path.is_file(), f"missing {path}"
    cfg = OmegaConf.load(path)
    assert cfg.name == name and cfg._target_ == "dpo_lightning.get_loss"
    assert instantiate(cfg, _convert_="all") == _build(name) == instantiate(cfg)
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith(("#", " "))]
    assert lines[0].startswith("_target_") or lines[0].startswith("#")
    for ln in lines:
        if not ln.startswith(("_target_", "name:")):
            assert "#" in ln, f"{path.name}: key without a comment: {ln!r}"


def test_no_yaml_without_a_registry_entry():
    assert {p.stem for p in CONF.glob("*.yaml")} == set(LOSSES)


def test_sweep_over_losses_composes():
    """`dpo-train -m loss=sigmoid,ipo,kto,simpo,mpo` splits into jobs that each compose and build their loss."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.utils import instantiate

    from dpo_lightning.cli.locate import compose

    overrides = OverridesParser.create().parse_overrides(["loss=sigmoid,ipo,kto,simpo,mpo", "loss.beta=0.2"])
    jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    assert len(jobs) == 5
    for job in jobs:
        cfg = compose("train", job)
        loss = instantiate(cfg.loss, _convert_="all")
        assert loss.beta == 0.2 and loss.name == cfg.loss.name
        assert loss.paired == (loss.name != "kto") and loss.needs_kl_pairs == (loss.name == "kto")
