"""Lightning's distributed engines, set up for preference training (the ``strategy`` config group).

    strategy=auto                     Lightning picks (one device, or DDP over several)
    strategy=ddp                      DistributedDataParallel: a full replica per device, gradients all-reduced
    strategy=fsdp                     FSDP: decoder layers sharded as units, activation checkpointing, sharded ckpts
    strategy=fsdp2                    Lightning's ModelParallelStrategy with FSDP2 (``fully_shard``) per layer
    strategy=deepspeed_zero2[_offload]  ZeRO-2 (optimizer state + gradients sharded; optionally on the CPU)
    strategy=deepspeed_zero3[_offload]  ZeRO-3 (parameters sharded too; optionally offloaded to the CPU)

The layer class that FSDP wraps (and checkpoints) is found from the model itself when the strategy sets up:
every Hugging Face model names its decoder block in ``_no_split_modules`` (``LlamaDecoderLayer``, ...).

The frozen reference lives inside the LightningModule, so every engine places and shards it like the policy;
it has ``requires_grad=False`` and the optimizer only receives the policy's trainable parameters, so it is
never trained. ``export.py`` gathers the full policy weights on rank 0 for the final ``save_pretrained``.

The log-prob engine calls the backbone and the LM head weight directly (``engine/logprobs.py``). Under DDP, FSDP1
and ZeRO-2 that is correct: FSDP1 wraps the whole LightningModule, so its root unit (embeddings, final
norm, LM head) is gathered for the whole step, and each decoder layer gathers itself. Under ZeRO-3 and
FSDP2 a parameter is only gathered when its own module's ``forward`` runs, so those strategies switch the
module to the model's own forward (``full_logits``: full logits instead of the chunked LM head).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy as _LDeepSpeed
from lightning.pytorch.strategies import FSDPStrategy as _LFSDP
from lightning.pytorch.strategies import ModelParallelStrategy as _LModelParallel
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from dpo_lightning.files.atomic import AtomicFolderSave

log = logging.getLogger("dpo_lightning")

KINDS = ("auto", "ddp", "fsdp", "model_parallel", "deepspeed")
SHARDED_KINDS = ("fsdp", "model_parallel", "deepspeed")


# --------------------------------------------------------------------------- which strategy a config names
def strategy_kind(node: Any) -> str:
    """``auto`` | ``ddp`` | ``fsdp`` | ``model_parallel`` | ``deepspeed`` (or the class name) for a ``strategy``
    config node: a string (Lightning's registry name) or a mapping with ``_target_``."""
    if node is None:
        return "auto"
    if isinstance(node, str):
        name = node.lower()
    else:
        target = node.get("_target_") if hasattr(node, "get") else None
        if not target:
            return "auto"
        from hydra.utils import get_class, get_method

        obj: Any  # a class, or a factory function
        try:
            obj = get_class(target)
        except Exception:  # a factory function, or a class that does not import here
            try:
                obj = get_method(target)
            except Exception:
                return str(target).rsplit(".", 1)[-1].lower()
        if isinstance(obj, type):
            from lightning.pytorch.strategies import DDPStrategy

            for base, kind in ((_LDeepSpeed, "deepspeed"), (_LFSDP, "fsdp"),
                               (_LModelParallel, "model_parallel"), (DDPStrategy, "ddp")):
                if issubclass(obj, base):
                    return kind
        name = str(target).rsplit(".", 1)[-1].lower()
    for kind in ("deepspeed", "fsdp", "model_parallel", "ddp", "auto"):
        if name.startswith(kind):
            return kind
    return name


# --------------------------------------------------------------------------- layer classes
def decoder_layer_classes(model: torch.nn.Module, names: list[str] | tuple[str, ...] | None = None) -> set[type]:
    """The decoder-block classes inside ``model``: ``names`` if given, else every Hugging Face model's
    ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``)."""
    wanted = set(names or ())
    if not wanted:
        for module in model.modules():
            wanted.update(getattr(module, "_no_split_modules", None) or ())
    classes = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    if not classes:
        hint = f"none of {sorted(wanted)} occurs in the model" if wanted else "the model names no _no_split_modules"
        raise ValueError(f"cannot find the decoder-layer class to shard ({hint}); name it explicitly, e.g. "
                         "strategy.auto_wrap=[LlamaDecoderLayer]")
    return classes


def _trainable_layers(module: torch.nn.Module, classes: set[type]) -> set[int]:
    """ids of the layers of ``classes`` that hold trainable parameters (the policy's, not the reference's)."""
    return {id(m) for m in module.modules()
            if isinstance(m, tuple(classes)) and any(p.requires_grad for p in m.parameters())}


def _use_full_forward(module: Any, why: str) -> None:
    """Route log-probs through the model's own ``forward`` (hooked by ZeRO-3 / FSDP2 parameter gathering)."""
    if hasattr(module, "full_logits") and not module.full_logits:
        rank_zero_info(f"{why}: log-probs use the model's own forward (full logits), since parameters are only "
                       "gathered inside their module's forward")
        module.full_logits = True


# --------------------------------------------------------------------------- FSDP (1)
class FSDPStrategy(AtomicFolderSave, _LFSDP):
    """Lightning's ``FSDPStrategy`` wrapping each decoder layer (found from the model) as an FSDP unit.

    Args:
        auto_wrap: ``decoder_layers`` (from the model's ``_no_split_modules``) or a list of class names.
        activation_checkpointing: recompute the policy's decoder layers in backward (the frozen
            reference's layers run without gradients and are never checkpointed).
        **kwargs: Lightning ``FSDPStrategy`` arguments: ``sharding_strategy``, ``state_dict_type``,
            ``cpu_offload``, and any ``FullyShardedDataParallel`` argument (``limit_all_gathers``, ...).
            Mixed precision follows ``trainer.precision`` (``bf16-mixed``: bf16 params, bf16 reduce).
    """

    def __init__(self, auto_wrap: str | list[str] = "decoder_layers", activation_checkpointing: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._wrap_names = None if auto_wrap in (None, "decoder_layers") else list(auto_wrap)
        self._checkpoint_layers = bool(activation_checkpointing)
        self._root: torch.nn.Module | None = None

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self._root is not None and getattr(self._root, "module", None) is model:
            return self._root  # validate/fit again on the same module: keep the root wrapper
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            classes = decoder_layer_classes(model, self._wrap_names)
            rank_zero_info(f"FSDP: wrapping {sorted(c.__name__ for c in classes)} as units")
            self.kwargs.setdefault("auto_wrap_policy", ModuleWrapPolicy(classes))
            if self._checkpoint_layers and not self._activation_checkpointing_kwargs:
                ids = _trainable_layers(model, classes)
                self._activation_checkpointing_kwargs = {"check_fn": lambda m: id(m) in ids}
        if self.root_device.type == "cpu" and not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            # FSDP on CPU processes (gloo) needs device_id=cpu, which Lightning does not pass. Only tests use
            # this: validate_config refuses FSDP without CUDA.
            from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing

            self._root = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)
            _setup_activation_checkpointing(self._root, self._activation_checkpointing_kwargs)
            return self._root
        self._root = super()._setup_model(model)
        return self._root

    def _saves_folder(self) -> bool:
        return self._state_dict_type == "sharded"

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Resume from a sharded checkpoint that lacks the frozen reference (``on_save_checkpoint`` drops it):
        load every other weight, and keep the reference as built from its source."""
        from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint

        from dpo_lightning.reference.reference import Reference

        path = Path(self.broadcast(checkpoint_path))
        moving = getattr(getattr(self.lightning_module, "reference", None), "moves", False)  # Reference.moves
        if not _is_sharded_checkpoint(path) or moving:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        loaded: list[str] = []

        def skip_reference(module, state_dict, prefix, local_metadata):
            for key in [k for k in state_dict if k.startswith(prefix + Reference.PREFIX)]:
                del state_dict[key]
            loaded[:] = list(state_dict)

        assert self.model is not None  # connected before a checkpoint loads
        handle = self.model.register_state_dict_post_hook(skip_reference)
        try:
            metadata = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        finally:
            handle.remove()
        metadata.setdefault("state_dict", dict.fromkeys(loaded))  # the keys it held, for on_load_checkpoint
        return metadata


# --------------------------------------------------------------------------- FSDP2 (ModelParallelStrategy)
class ModelParallelStrategy(AtomicFolderSave, _LModelParallel):
    """Lightning's ``ModelParallelStrategy`` used for pure data parallelism with FSDP2 (``fully_shard``).

    Each decoder layer of the policy and of the reference, then each whole model, becomes a ``fully_shard``
    unit over all ranks (no tensor parallelism). Log-probs go through the model's own forward.

    Args:
        auto_wrap: ``decoder_layers`` or a list of class names (as for ``FSDPStrategy``).
        activation_checkpointing: recompute the policy's decoder layers in backward.
        reshard_after_forward: free gathered parameters after forward (ZeRO-3 like) or keep them (ZeRO-2 like).
        **kwargs: Lightning ``ModelParallelStrategy`` arguments (``save_distributed_checkpoint``, ...).
    """

    def __init__(self, auto_wrap: str | list[str] = "decoder_layers", activation_checkpointing: bool = True,
                 reshard_after_forward: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)
        self._wrap_names = None if auto_wrap in (None, "decoder_layers") else list(auto_wrap)
        self._checkpoint_layers = bool(activation_checkpointing)
        self._reshard = bool(reshard_after_forward)
        self._sharded = False

    def _saves_folder(self) -> bool:
        return bool(self._save_distributed_checkpoint)

    def setup_environment(self) -> None:
        if self._tensor_parallel_size == 1 and self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer) -> None:
        # Lightning's own setup, less its demand that the LightningModule shard itself in configure_model():
        # we shard here, from the model's layer classes.
        from lightning.fabric.utilities.init import _materialize_distributed_module
        from lightning.fabric.utilities.optimizer import _optimizers_to_device
        from lightning.pytorch.trainer.states import TrainerFn

        assert self.accelerator is not None and self.model is not None  # as Lightning's own setup asserts
        assert self.lightning_module is not None
        self.accelerator.setup(trainer)
        if not self._sharded:
            self._shard(self.lightning_module)
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _shard(self, module: torch.nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        classes = decoder_layer_classes(module, self._wrap_names)
        trainable = _trainable_layers(module, classes)
        if self._checkpoint_layers:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                apply_activation_checkpointing,
            )

            apply_activation_checkpointing(module, check_fn=lambda m: id(m) in trainable)
        for layer in [m for m in module.modules() if isinstance(m, tuple(classes))]:
            fully_shard(layer, mesh=mesh, reshard_after_forward=self._reshard)
        reference = getattr(module, "reference", None)
        for model in (getattr(module, "policy", None), getattr(reference, "module", None)):  # the forwards that run
            if isinstance(model, torch.nn.Module):
                fully_shard(model, mesh=mesh, reshard_after_forward=self._reshard)
        _use_full_forward(module, "FSDP2")
        self._sharded = True


# --------------------------------------------------------------------------- DeepSpeed
class DeepSpeedStrategy(AtomicFolderSave, _LDeepSpeed):
    """Lightning's ``DeepSpeedStrategy`` (ZeRO stage 2 or 3, optional CPU offload).

    With an offloaded optimizer DeepSpeed would refuse our ``torch.optim`` optimizer; we allow it
    (``zero_force_ds_cpu_optimizer: false``). ``optimizer.name=deepspeed.ops.adam.DeepSpeedCPUAdam`` is faster.
    Under ZeRO-3 the log-probs go through the model's own forward. Frozen weights (the reference; the base
    model under LoRA) are left out of checkpoints: they are rebuilt from their source. Checkpoint folders
    are written atomically (``AtomicFolderSave``).
    """

    def __init__(self, stage: int = 2, offload_optimizer: bool = False, offload_parameters: bool = False,
                 exclude_frozen_parameters: bool = True, **kwargs: Any) -> None:
        super().__init__(stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters,
                         exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if offload_optimizer and isinstance(self.config, dict):
            self.config.setdefault("zero_force_ds_cpu_optimizer", False)

    def setup(self, trainer) -> None:
        if self.zero_stage_3:
            _use_full_forward(self.lightning_module, "DeepSpeed ZeRO-3")
        super().setup(trainer)


def build_strategy(node: Any):
    """The ``strategy`` argument of the Trainer for a config node: a registry name as is, else instantiated."""
    if node is None:
        return "auto"
    if isinstance(node, str):
        return node
    from hydra.utils import instantiate

    return instantiate(node, _convert_="all")
