"""Issue 12, defects 3, 5, 11, 12: resume under DeepSpeed, the export's reference record, atomic saves of
checkpoint folders and exports, and cache/checkpoint files that load without running pickled code."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch


class _Payload:
    """Unpickling this runs code: it creates the file named by ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def module(tiny_path):
    from dpo_lightning import PreferenceLitModule

    torch.manual_seed(0)
    return PreferenceLitModule(str(tiny_path), loss="bco")


def test_resume_from_a_deepspeed_client_state(module):
    """Lightning's DeepSpeed strategy restores the weights inside the engine and hands the module the client
    state it saved: the checkpoint without ``state_dict`` (and ``optimizer_states``)."""
    client_state = {"epoch": 0, "global_step": 3, "pytorch-lightning_version": "2.6.6",
                    "loops": {}, "callbacks": {}, "lr_schedulers": [], "hyper_parameters": dict(module.hparams),
                    "loss_state": {"running_mean": torch.tensor(0.25), "count": 12.0}}
    module.on_load_checkpoint(client_state)
    assert float(module.loss_state["running_mean"]) == 0.25 and module.loss_state["count"] == 12.0
    with pytest.raises(KeyError, match="lacks policy weights"):  # a plain checkpoint must still hold them
        module.on_load_checkpoint({"state_dict": {}, "loss_state": {}})


def test_reference_cache_is_safetensors_and_a_planted_pickle_never_runs(tmp_path):
    from safetensors.torch import load_file

    from dpo_lightning import reference_cache as rc

    values = {"ref_chosen_logps": torch.tensor([-1.0, -2.0]), "ref_rejected_logps": torch.tensor([-3.0, -4.0])}
    path = tmp_path / "reference" / "key.safetensors"
    rc.save_atomic(path, values, {"rows": 2, "version": rc.CACHE_VERSION})
    on_disk = load_file(str(path))  # a plain safetensors file: no pickle inside
    assert on_disk.keys() == values.keys() and all(torch.equal(on_disk[k], values[k]) for k in values)
    assert all(torch.equal(rc.load(path, 2)[k], values[k]) for k in values)
    marker = tmp_path / "pwned"
    path.write_bytes(pickle.dumps({"values": _Payload(str(marker))}))
    assert rc.load(path, 2) is None and not marker.exists()  # unreadable = a miss, recomputed


def test_checkpoints_load_without_running_pickled_code(tmp_path, monkeypatch):
    """Even where torch.load would default to full unpickling (old torch, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)."""
    from dpo_lightning.io import AtomicCheckpointIO

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    io = AtomicCheckpointIO()
    good = tmp_path / "good.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, good)
    assert io.load_checkpoint(good)["global_step"] == 3
    marker, bad = tmp_path / "pwned", tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "x": _Payload(str(marker))}, bad)
    with pytest.raises(Exception):  # noqa: B017 - torch's UnpicklingError subclass varies by version
        io.load_checkpoint(bad)
    assert not marker.exists()
