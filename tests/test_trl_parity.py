"""Parity with TRL 1.16 (``scripts/trl_parity.py``): skipped where TRL is not installed.

TRL is not a dependency. To run these against a separate TRL environment with the same torch/transformers:

    TRL_SITE_PACKAGES=/path/to/trlenv/lib/python3.11/site-packages pytest tests/test_trl_parity.py
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from arch_families import FAMILIES
from helpers import needs_for_family, requires_vision

if os.environ.get("TRL_SITE_PACKAGES") and os.environ["TRL_SITE_PACKAGES"] not in sys.path:
    sys.path.append(os.environ["TRL_SITE_PACKAGES"])
trl = pytest.importorskip("trl")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "trl_parity.py"


@pytest.fixture(scope="module")
def parity():
    if not trl.__version__.startswith("1.16"):
        pytest.skip(f"parity is pinned to TRL 1.16 (found {trl.__version__})")
    spec = importlib.util.spec_from_file_location("trl_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", [0, 1])
def test_logprob_level_parity_every_loss(parity, seed):
    """Per-example losses, rewards and batch metrics within 1e-5 of TRL's for every loss TRL has."""
    for c in parity.CASES:
        if c.trl is None:
            continue
        r = parity.compare_logps(c, seed=seed)
        assert not r["missing"], (c.label, r["missing"])
        for key in ("per_example", "reward", "metric"):
            assert r[key] is None or r[key] <= parity.TOL_LOGPS, (c.label, key, r[key], r["metric_key"])


@pytest.mark.slow
def test_tiny_policy_against_reference_parity(parity):
    """One tiny policy vs. one reference through TRL's trainers and our module: loss and metrics within 1e-4."""
    for r in parity.part2():
        assert r["tokens_equal"] and not r["missing"], r
        assert r["metric"] <= parity.TOL_MODEL, r


@pytest.fixture(scope="module")
def parity_archs():
    if not trl.__version__.startswith("1.16"):
        pytest.skip(f"parity is pinned to TRL 1.16 (found {trl.__version__})")
    spec = importlib.util.spec_from_file_location("trl_parity_archs", SCRIPT.with_name("trl_parity_archs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_dpo_eval_matches_trl_evaluate_per_family(parity_archs, family, tmp_path):
    """dpo-eval (default engine) vs. TRL's DPOTrainer.evaluate() on the family's tiny policy and reference:
    policy log-probs within 1e-4 relative, loss within 1e-3, identical reward accuracy (MoE: router loss too)."""
    r = parity_archs.compare(family, tmp_path)
    assert r["logps"] <= parity_archs.TOL_LOGPS, r
    assert r["loss"] <= parity_archs.TOL_LOSS, r
    assert r["accuracy_equal"], r
    assert r["aux"] is None or r["aux"] <= parity_archs.TOL_LOSS, r


@pytest.fixture(scope="module")
def parity_vision():
    if not trl.__version__.startswith("1.16"):
        pytest.skip(f"parity is pinned to TRL 1.16 (found {trl.__version__})")
    spec = importlib.util.spec_from_file_location("trl_parity_vision", SCRIPT.with_name("trl_parity_vision.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# every tiny family but PaliGemma (TRL 1.16 cannot evaluate it: its processor refuses TRL's text-only calls)
VISION_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3",
                   "smolvlm", "gemma3", "mistral3", "aya_vision", "internvl")


@pytest.mark.slow
@requires_vision
@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_dpo_eval_matches_trl_evaluate_with_images(parity_vision, family, tmp_path):
    """dpo-eval vs. TRL's DPOTrainer.evaluate() on the family's tiny VLM policy and reference, 8 pairs with
    generated images (one with two images, one text-only): policy log-probs within 1e-4 relative, loss within
    1e-3, identical reward accuracy, with each pair's images once (prefix_shared) and twice (plain, TRL's)."""
    needs_for_family(family)
    r = parity_vision.compare(family, tmp_path)
    assert set(r["layouts"]) == {"prefix_shared", "plain"}
    for layout, lr in r["layouts"].items():
        assert lr["logps"] <= parity_vision.TOL_LOGPS, (layout, r)
        assert lr["loss"] <= parity_vision.TOL_LOSS, (layout, r)
        assert lr["accuracy_equal"], (layout, r)
