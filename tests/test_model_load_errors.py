"""A model that cannot be loaded stops with one line naming the path or hub id, what was looked for and the fix
(``ModelLoadError``), fast: a missing folder, a folder without a saved model, a hub id neither cached nor
reachable (the endpoint points at a closed local port: no network is touched)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dpo_lightning.models.hf import ModelLoadError, ModelSpec, load_causal_lm, load_tokenizer


def test_a_missing_folder_and_a_folder_without_a_model(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelLoadError, match=r"model '.*/no/such/model': no such folder .*local model folder.*"
                                             r"HF_HUB_OFFLINE=1.*token"):
        load_causal_lm(ModelSpec(str(missing)))
    with pytest.raises(ModelLoadError, match=r"has none of config.json"):
        load_tokenizer(ModelSpec(str(tmp_path)))


def test_an_unreachable_hub_id_fails_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"model 'someone/not-cached-model': not a local folder, not in the hub "
                                             r"cache, and http://127.0.0.1:9 cannot be reached; .*HF_HUB_OFFLINE=1"):
        load_causal_lm(ModelSpec("someone/not-cached-model"))
    assert time.perf_counter() - start < 10


@pytest.mark.subprocess
@pytest.mark.parametrize("name", ["./no/such/folder", "someone/not-cached-model"])
def test_dpo_train_prints_one_line(tmp_path, name):
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-m", "dpo_lightning.train", "model=hf", f"model.name_or_path={name}",
                          "logger=none", "print_config=false", f"paths.output_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=os.getcwd())
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error: ")]
    assert name.lstrip("./") in line and "HF_HUB_OFFLINE=1" in line


def test_the_built_in_model_and_a_saved_folder_still_load(tiny_path):
    assert load_tokenizer(ModelSpec("builtin:tiny-llama")).eos_token == "</s>"
    assert load_tokenizer(ModelSpec(str(tiny_path))).eos_token == "</s>"
