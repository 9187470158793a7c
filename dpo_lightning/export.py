"""The one place that writes an export: the trained policy (gathered from any strategy), its tokenizer and the
record of its reference, ``save_pretrained`` into a temporary folder that is renamed into place.

    export_policy(trainer, module, tokenizer, out_dir)   every rank calls it (sharded weights are gathered)
    export_pretrained(model, tokenizer, out_dir)          one unwrapped model, atomically
    export_module(module, out_dir)                        one call from a plain Lightning script: policy,
                                                          tokenizer (loaded from the module's model when not
                                                          given) and reference.json

The folder loads with ``AutoModelForCausalLM.from_pretrained`` (a LoRA policy: its adapter, or merged with
``merge_adapters``) and carries ``reference.json`` (``reference/record.py``) for ``dpo-eval``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, cast

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy as _LDeepSpeed
from lightning.pytorch.strategies import FSDPStrategy as _LFSDP
from lightning.pytorch.strategies import ModelParallelStrategy as _LModelParallel

from dpo_lightning.files.atomic import honour_umask, replace_folder, temp_dir, writing
from dpo_lightning.models.peft import is_peft_model
from dpo_lightning.reference.record import REFERENCE_FILE


def full_policy_state_dict(trainer, module) -> dict[str, torch.Tensor] | None:
    """The policy's full (unsharded) state dict on rank 0, gathered from a sharded strategy; ``{}`` on other
    ranks. None when the policy is not sharded (single device, DDP, ZeRO-2): use ``module.policy`` itself.

    Collective under FSDP / FSDP2 / ZeRO-3: every rank must call it.
    """
    strategy = trainer.strategy
    rank0 = trainer.is_global_zero
    if isinstance(strategy, _LFSDP):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = strategy.model
        assert root is not None  # set up by the fit that trained it
        offload = strategy.root_device.type != "cpu"  # to CPU memory, one unit at a time, on rank 0 only
        with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=offload, rank0_only=True)):
            state = root.state_dict()
        return {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")} if rank0 else {}
    if isinstance(strategy, _LModelParallel):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return cast(dict[str, torch.Tensor], state) if rank0 else {}  # full_state_dict: plain tensors
    if isinstance(strategy, _LDeepSpeed) and strategy.zero_stage_3:
        import deepspeed

        state = {}
        for name, sub in module.policy.named_modules():  # one module at a time: bounded GPU memory
            params = list(sub.named_parameters(recurse=False))
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                if rank0:
                    for pname, p in params:
                        state[f"{name}.{pname}" if name else pname] = p.detach().cpu().clone()
        if rank0:
            for name, buf in module.policy.named_buffers():
                state.setdefault(name, buf.detach().cpu())
        return state
    return None


def _fresh_policy(module, *, quantized: bool):
    """An unwrapped copy of the policy's architecture (with its adapters), loaded on the CPU."""
    from dataclasses import replace

    from dpo_lightning.models.hf import load_causal_lm
    from dpo_lightning.models.peft import apply_peft

    spec = module.model_spec if quantized else replace(module.model_spec, quantization=None)
    return apply_peft(load_causal_lm(spec), getattr(module, "peft_settings", None))


def export_policy(trainer, module, tokenizer, out_dir: str | Path, *, merge_adapters: bool = False) -> Path | None:
    """``save_pretrained`` the trained policy (+ tokenizer) to ``out_dir`` on rank 0; returns the folder there
    and None on other ranks. Call it on every rank: sharded weights are gathered collectively first.

    A LoRA policy is saved as its adapter, or merged into the base weights with ``merge_adapters``; a
    quantized (QLoRA) policy is merged into a freshly loaded full-precision base (``model.dtype``).
    ``reference.json`` beside the weights records the reference (``reference/record.py``) for ``dpo-eval``.
    """
    state = full_policy_state_dict(trainer, module)
    if not trainer.is_global_zero:
        return None
    policy = module.policy
    quantized = bool(getattr(module.model_spec, "quantization", None))
    if state is not None:  # sharded: load the gathered weights into an unwrapped copy
        extra = module.reference.adapter  # TR-DPO's mixed adapter is not exported
        state = {k: v for k, v in state.items() if not extra or f".{extra}." not in k}
        policy = _fresh_policy(module, quantized=False)
        missing, unexpected = policy.load_state_dict(state, strict=False)
        # a tied weight (lm_head = embed_tokens) may be gathered under one of its names only
        params = dict(policy.named_parameters(remove_duplicate=False))
        loaded = {params[k].data_ptr() for k in state if k in params}
        missing = [k for k in missing if not (k in params and params[k].data_ptr() in loaded)]
        if unexpected or missing:
            raise RuntimeError(f"export: gathered policy weights do not match the model (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    elif merge_adapters and quantized and is_peft_model(policy):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        fresh = _fresh_policy(module, quantized=False)
        set_peft_model_state_dict(fresh, {k: v.detach().cpu() for k, v in get_peft_model_state_dict(policy).items()})
        policy = fresh
    return export_pretrained(policy, tokenizer, out_dir, merge_adapters=merge_adapters,
                             records={REFERENCE_FILE: module.reference.record()})



def export_module(module, out_dir: str | Path, tokenizer: Any = None, *, merge_adapters: bool = False) -> Path | None:
    """Export a trained ``PreferenceLitModule`` in one call, as ``dpo-train`` does: the policy, its tokenizer
    (``tokenizer``, or loaded from ``module.model_spec``) and ``reference.json``. After ``trainer.fit`` it goes
    through the module's trainer (call it on every rank: sharded weights are gathered; rank 0 writes and gets
    the folder, other ranks None); a module never attached to a trainer is saved as it is.

        L.Trainer(...).fit(module, datamodule=data)
        export_module(module, "my-policy")        # AutoModelForCausalLM / AutoTokenizer.from_pretrained("my-policy")
    """
    if tokenizer is None:
        from dpo_lightning.models.hf import load_tokenizer

        tokenizer = load_tokenizer(module.model_spec)
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        return export_policy(trainer, module, tokenizer, out_dir, merge_adapters=merge_adapters)
    return export_pretrained(module.policy, tokenizer, out_dir, merge_adapters=merge_adapters,
                             records={REFERENCE_FILE: module.reference.record()})


def export_pretrained(model, tokenizer, out_dir: str | Path, *, merge_adapters: bool = False,
                      records: dict[str, Any] | None = None) -> Path:
    """``save_pretrained`` the policy (+ tokenizer) into ``out_dir`` atomically (temp folder + rename).

    A PEFT policy is saved as its adapter, or merged into the base weights when ``merge_adapters``.
    ``records`` are small JSON files written beside the weights (``{"reference.json": {...}}``).
    A failed write (a full disk: ``WriteError`` naming ``out_dir``) removes the temp folder; a previous
    export at ``out_dir`` stays whole.
    """
    out_dir = Path(out_dir)
    with writing(out_dir):  # a full disk or read-only folder: WriteError naming the export, the old one kept
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(out_dir.parent, prefix=f".{out_dir.name}.")
    try:
        if merge_adapters and is_peft_model(model):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        adapters = list(model.peft_config) if is_peft_model(model) else []
        with writing(out_dir):
            if len(adapters) > 1:  # TR-DPO's mixed "reference" adapter stays out of the export
                model.save_pretrained(tmp, selected_adapters=[model.active_adapter])
            else:
                model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, data in (records or {}).items():
                (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")  # the folder is the unit
            honour_umask(tmp)  # the weights file is written 0600 by save_pretrained: readable like any other file
            replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
