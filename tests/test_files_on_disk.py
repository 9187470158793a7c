"""Files a run writes and reads back: resume from a DeepSpeed client state, reference caches as safetensors and
checkpoints that load without running pickled code, an export that survives a failed replacement, and a sharded
checkpoint whose save is killed half-way leaving the previous one whole."""

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

    from dpo_lightning.reference import cache as rc

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
    from dpo_lightning.files.atomic import AtomicCheckpointIO

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


def test_export_renames_the_old_export_aside_until_the_new_one_is_in(tmp_path, monkeypatch, tiny_path):
    """A failure while the new export moves in leaves the old export whole (renamed aside, not deleted first)."""
    from transformers import AutoModelForCausalLM

    from dpo_lightning import export as io

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    out = io.export_pretrained(model, None, tmp_path / "export")
    before = (out / "model.safetensors").read_bytes()
    real_rename = Path.rename

    def crash_on_move_in(self, target):
        if Path(target) == out and self.name.startswith(".export.") and not self.name.endswith(".old"):
            raise OSError("killed while renaming the new export in")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_move_in)
    with pytest.raises(OSError, match="killed"):
        io.export_pretrained(model, None, out)
    monkeypatch.undo()
    survivor = out if out.exists() else out.with_name(".export.old")
    assert (survivor / "model.safetensors").read_bytes() == before  # the old export survives whole
    AutoModelForCausalLM.from_pretrained(survivor)


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_process_killed_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path):
    from helpers import run_script
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    snapshot, out = tmp_path / "snapshot", tmp_path / "run"
    res = run_script("kill_during_save.py", str(snapshot), "strategy=fsdp", "trainer.accelerator=cpu",
                     "trainer.devices=1", "logger=none", "callbacks=default", "~callbacks.progress_bar",
                     "~callbacks.throughput", "~callbacks.training_curves", "callbacks.model_checkpoint.save_top_k=-1",
                     "trainer.max_steps=6", "trainer.val_check_interval=2", "data.batch_size=8",
                     "optimizer.lr=1e-2", "trainer.gradient_clip_val=null", "print_config=false",
                     f"paths.output_dir={out}", timeout=300, cwd=tmp_path)
    assert res.returncode == -9, res.stderr[-3000:]  # killed inside the second save of last.ckpt
    last = out / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").exists()
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 2  # the first save, whole
    dcp_to_torch_save(str(last), str(tmp_path / "last.pt"))
    dcp_to_torch_save(str(snapshot), str(tmp_path / "snapshot.pt"))
    kept, first = (torch.load(tmp_path / f, weights_only=False)["model"] for f in ("last.pt", "snapshot.pt"))
    assert kept.keys() == first.keys()
    for k in first:
        assert torch.equal(kept[k], first[k]), f"{k}: the surviving checkpoint is not the one saved at step 2"
