"""The reference as one object: ``PreferenceLitModule.reference``, asked by everything that needs it.

    ref = Reference.build(ReferenceSpec(), loss, policy, policy_spec)
    ref.mode                        Mode.COPY | MODEL | ADAPTER | CACHED | NONE (``spec.py``)
    ref.needs_model                 a live reference runs a forward for every batch (copy, model, adapter)
    ref.is_precomputed              its log-probs come with the batch (``reference.precompute``)
    ref.module                      the frozen model of copy / model; None otherwise
    with ref.scoring_model() as m:  the model to score with (the frozen model, or the policy with its adapters
                                    disabled or switched to TR-DPO's reference adapter); None without one;
                                    ``open_cached=True``: precomputed too (loaded for the block, then released)
    ref.logps(batch)                reference log-probs of a batch; None when precomputed or not needed
    ref.precompute(datamodule)      fill the data module's rows from the disk cache (``cache.py``)
    ref.sync, ref.moves, ref.adapter, ref.version    TR-DPO (``sync.py``)
    ref.on_save_checkpoint(ckpt), ref.on_load_checkpoint(ckpt, keys)    what a checkpoint keeps of it
    ref.record()                    the export's ``reference.json`` (``record.py``)

Weight names: the module registers it as ``reference`` and it adopts the frozen model's children as its own,
so the weights are named ``reference.<the model's own names>`` in state dicts, checkpoints and sharding (FSDP
units, activation-checkpoint wrappers, distributed checkpoint keys), and ``ref.state_dict()`` is the frozen
model's. A model with tensors of its own at the top level (or a child named like a ``Reference`` attribute) is
held as one child instead, ``reference.model_.<names>``. The model object itself and the policy are held outside the module tree (the policy's weights are the
LightningModule's ``policy.*``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from dpo_lightning.engine.logprobs import SeqLogps, sequence_logps
from dpo_lightning.models.hf import ModelSpec
from dpo_lightning.models.peft import adapter_active, adapters_disabled, is_peft_model
from dpo_lightning.reference.record import reference_record
from dpo_lightning.reference.spec import Mode, ReferenceSpec, build_reference, check_precompute
from dpo_lightning.reference.sync import prepare_reference_sync, sync_settings

LIVE_MODES = (Mode.COPY, Mode.MODEL, Mode.ADAPTER)  # a forward per batch


class Reference(torch.nn.Module):
    """The reference of a ``PreferenceLitModule``: its mode, frozen model or adapter, TR-DPO state and cache.

    Args:
        spec: the ``reference`` settings.
        mode: the resolved mode (``Reference.build`` resolves it from the spec, the loss and the policy).
        policy: the policy (the adapter reference runs it with adapters disabled; TR-DPO mixes it in).
        policy_spec: how the policy was loaded (a copy reloads it; the record names it).
        module: the frozen model of copy / model mode.
        loss_name: the loss this reference serves (the record names it).
    """

    PREFIX = "reference."  # its attribute name in the LightningModule: the prefix of its weights' keys

    def __init__(self, spec: ReferenceSpec, mode: Mode | str, *, policy: torch.nn.Module, policy_spec: ModelSpec,
                 module: torch.nn.Module | None = None, loss_name: str = ""):
        super().__init__()
        self.spec, self.mode, self.policy_spec, self.loss_name = spec, Mode(mode), policy_spec, loss_name
        self.__dict__["_policy"] = policy  # outside the module tree: not a second copy of policy.* in state dicts
        self.__dict__["_module"] = module  # outside too: its children are adopted below
        self.adapter: str | None = None  # TR-DPO with LoRA: the policy's mixed "reference" adapter
        self.version = 0  # bumped each time the reference moves (TR-DPO)
        self.sync = sync_settings(spec.sync)  # (alpha, every_n_steps) or None
        self.cache_infos: list[dict[str, Any]] = []  # one per row set precomputed (the sweep report counts them)
        if module is not None:
            own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
            clash = [n for n, _ in module.named_children() if n in self.__dict__ or hasattr(type(self), n)]
            if own or clash:  # cannot adopt its children under their own names: hold the model as one child
                self.add_module("model_", module)
            else:
                for name, child in module.named_children():
                    self.add_module(name, child)
        self.train(False)

    @classmethod
    def build(cls, spec: ReferenceSpec, loss, policy: torch.nn.Module, policy_spec: ModelSpec) -> Reference:
        """The reference ``spec`` asks for, for ``loss`` (a registry ``Loss``) and ``policy``: the mode resolved,
        the frozen model loaded (copy / model), TR-DPO's reference adapter added (LoRA with ``sync``)."""
        mode = spec.resolve_mode(loss.requires_reference, is_peft_model(policy))
        if spec.precompute and loss.requires_reference:
            check_precompute(bool(getattr(loss, "needs_kl_pairs", False)), loss.name)
            mode = Mode.CACHED  # filled in before training (``precompute``)
        reference = cls(spec, mode, policy=policy, policy_spec=policy_spec, loss_name=loss.name,
                        module=build_reference(mode, spec, policy_spec, policy))
        if reference.sync:
            prepare_reference_sync(reference)
        return reference

    # ---------------------------------------------------------------- what it is
    @property
    def module(self) -> torch.nn.Module | None:
        """The frozen model (copy / model mode), or None (the adapter reference is the policy itself)."""
        return self.__dict__["_module"]

    @property
    def policy(self) -> torch.nn.Module:
        return self.__dict__["_policy"]

    @property
    def needs_model(self) -> bool:
        """True when a model computes reference log-probs for every batch (copy, model, adapter)."""
        return self.mode in LIVE_MODES

    @property
    def is_precomputed(self) -> bool:
        """True when the log-probs are precomputed and read from the batch (``reference.precompute``)."""
        return self.mode is Mode.CACHED

    @property
    def moves(self) -> bool:
        """True when TR-DPO moves the reference during training (``reference.sync``)."""
        return self.sync is not None

    @property
    def dtype(self) -> str | None:
        """The dtype name the reference's weights are loaded in: ``reference.dtype``, else the policy's."""
        return self.spec.dtype or self.policy_spec.dtype

    def train(self, mode: bool = True) -> Reference:
        """The reference is frozen: it stays in eval mode whatever Lightning asks."""
        super().train(False)
        if self.module is not None:
            self.module.train(False)  # the model's own flag (its children are this module's)
        return self

    def extra_repr(self) -> str:
        return f"mode={self.mode.value}" + (f", sync={self.sync}" if self.sync else "")

    # ---------------------------------------------------------------- scoring
    @contextlib.contextmanager
    def scoring_model(self, *, open_cached: bool = False):
        """The model that computes the reference, inside the block: the frozen model, or the policy with its
        adapters disabled (or switched to TR-DPO's ``reference`` adapter); None without one.

        ``open_cached``: with precomputed log-probs (mode ``cached``) there is no model during training; open
        one for the block (generation evaluation scores new samples, which no cache holds): the policy with
        its adapters disabled, or the reference weights loaded from their source (``reference.name_or_path``,
        else the policy's initial weights' files) and released when the block ends."""
        if self.mode is Mode.ADAPTER:
            policy = self.policy
            with adapter_active(policy, self.adapter) if self.adapter else adapters_disabled(policy):
                yield policy
        elif self.module is not None:
            self.eval()
            yield self.module
        elif self.mode is Mode.CACHED and open_cached and not self.moves:
            with self._opened() as model:
                yield model
        else:
            yield None

    @contextlib.contextmanager
    def _opened(self):
        """The weights precomputed log-probs came from, for one block (``reference/cache.py`` computes them
        the same way: adapters disabled, the initial policy's files, or the separate reference)."""
        policy, spec = self.policy, self.spec
        if not spec.separate and is_peft_model(policy):
            with adapters_disabled(policy):
                yield policy
            return
        if not spec.separate and self.policy_spec.quantization is not None:
            yield None  # a quantized policy trains through adapters only: the branch above; nothing to load
            return
        mode = Mode.MODEL if spec.name_or_path else Mode.COPY
        model = build_reference(mode, spec, self.policy_spec, policy)  # from files: the initial weights
        device = next(policy.parameters()).device
        if not any(getattr(model, f, False) for f in ("is_loaded_in_4bit", "is_loaded_in_8bit")):
            model.to(device)
        try:
            yield model
        finally:
            del model
            import gc

            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def logps(self, batch: dict[str, Any], *, chunk_size: int = 1024, full_logits: bool = False) -> SeqLogps | None:
        """Reference log-probs for the batch, or None when they come precomputed or are not needed."""
        if not self.needs_model:
            return None
        with self.scoring_model() as model:
            return sequence_logps(model, batch, batch["num_sequences"], chunk_size=chunk_size,
                                  full_logits=full_logits)

    def precompute(self, datamodule, *, trainer=None, chunk_size: int = 1024,
                   policy_trained: bool = False) -> list[dict[str, Any]]:
        """Fill the data module's train and validation rows with cached reference log-probs (``cache.py``);
        returns one info dict per row set computed or loaded."""
        from dpo_lightning.reference.cache import precompute_reference

        infos = precompute_reference(self, datamodule, trainer=trainer, chunk_size=chunk_size,
                                     policy_trained=policy_trained)
        self.cache_infos.extend(infos)
        return infos

    # ---------------------------------------------------------------- checkpoints and exports
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A frozen reference is rebuilt from its source on load: its weights are dropped from the checkpoint.
        A moving (TR-DPO) reference is kept: it cannot be rebuilt. Its version is kept either way."""
        if not self.moves:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith(self.PREFIX)}
        checkpoint["reference_version"] = self.version

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that a checkpoint of a moving reference holds its weights; restore the version."""
        if self.moves and self.module is not None:
            missing = [self.PREFIX + k for k in self.state_dict() if self.PREFIX + k not in checkpoint["state_dict"]]
            if missing:
                raise KeyError(f"reference.sync is on but the checkpoint lacks the moved reference (e.g. {missing[:2]}); "
                               "it was saved without TR-DPO: resume with reference.sync.every_n_steps=0")
        self.version = int(checkpoint.get("reference_version", 0))

    def record(self) -> dict[str, Any]:
        """Where this reference came from, as the export's ``reference.json`` holds it (``record.py``)."""
        return reference_record(self)
