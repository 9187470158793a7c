"""TR-DPO: a reference that moves towards the policy (Gorbatovski et al. 2024, arXiv:2404.09656, Sec. 3).

Every ``every_n_steps`` optimizer steps, pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref, parameter by
parameter (the paper's soft update, Eq. 4; alpha = 1 is its hard update, Eq. 5). TRL's defaults: alpha 0.6,
every 512 steps (``ref_model_mixup_alpha``, ``ref_model_sync_steps``).

    dpo-train reference.sync.every_n_steps=64 reference.sync.alpha=0.6
    PreferenceLitModule(..., reference={"sync": {"alpha": 0.6, "every_n_steps": 64}})   # adds the callback

Where the reference lives:
    copy / model  the reference module's parameters are mixed with the policy's of the same name
    adapter       (LoRA) a second adapter named ``reference`` (a copy of the policy's initial adapter, so the
                  reference starts as the base model) is mixed with the trained one; the base is never touched
Under DDP every rank mixes its own replica (identical on every rank). Under FSDP each rank mixes its own shards
in place where the policy's and the reference's parameters are sharded alike (a policy layer and its reference
twin are identical units); parameters that share one unit at different offsets (the root unit; a LoRA layer
holding both adapters) are gathered one unit at a time (``summon_full_params(unit, recurse=False)``), mixed and
written back: never the whole model. FSDP2 shards every parameter alike, so its local shards are mixed as they are.

Once the reference moves it is saved in checkpoints (``Reference.on_save_checkpoint``) and restored on resume.
The functions here take the ``Reference`` (``reference.py``), which holds the policy, the mode and the version.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from dpo_lightning.reference.spec import Mode

REFERENCE_ADAPTER = "reference"


def sync_settings(sync: dict[str, Any] | None) -> tuple[float, int] | None:
    """(alpha, every_n_steps) from ``reference.sync``, or None when off; raises on an invalid value."""
    if not sync:
        return None
    unknown = sorted(set(sync) - {"alpha", "every_n_steps"})
    if unknown:
        raise ValueError(f"reference.sync: unknown keys {unknown}; known: alpha, every_n_steps")
    every, alpha = int(sync.get("every_n_steps") or 0), float(sync.get("alpha", 0.6))
    if every < 0:
        raise ValueError(f"reference.sync.every_n_steps={every}: must be >= 1 (0 = off)")
    if every == 0:
        return None
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"reference.sync.alpha={alpha}: must be in (0, 1] (1 = hard update: copy the policy)")
    return alpha, every


def prepare_reference_sync(reference) -> None:
    """Check that ``reference`` (a ``Reference``) can move, and give a LoRA policy its ``reference`` adapter."""
    if not reference.needs_model:
        cached = reference.is_precomputed
        why = "reference.precompute=true freezes its log-probs" if cached else "the loss uses no reference"
        raise ValueError(f"reference.sync (TR-DPO) moves the reference, but {why}; set reference.sync.every_n_steps=0"
                         + (" or reference.precompute=false" if cached else ""))
    if reference.mode is Mode.ADAPTER:
        policy = reference.policy
        config = policy.peft_config["default"]
        if getattr(config, "bias", "none") != "none":
            raise ValueError("reference.sync with LoRA mixes the adapters; peft.bias trains base-model biases the two "
                             "adapters would share: set peft.bias=none")
        policy.add_adapter(REFERENCE_ADAPTER, config)  # the active (trainable) adapter stays "default"
        with torch.no_grad():
            for ref, pol in _adapter_pairs(policy):
                ref.copy_(pol)
                ref.requires_grad_(False)
        reference.adapter = REFERENCE_ADAPTER
    pairs = parameter_pairs(reference)
    if not pairs:
        raise ValueError("reference.sync: found no parameters to mix between the policy and the reference")


def _adapter_pairs(policy: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(reference-adapter parameter, policy-adapter parameter) pairs of a PEFT model, matched by name."""
    params = dict(policy.named_parameters())
    pairs = []
    for name, p in params.items():
        if ".default." in name or name.endswith(".default"):
            twin = name.replace(".default.", f".{REFERENCE_ADAPTER}.")
            if name.endswith(".default"):
                twin = name[: -len("default")] + REFERENCE_ADAPTER
            if twin not in params:
                raise ValueError(f"reference.sync: the reference adapter lacks {twin}")
            pairs.append((params[twin], p))
    return pairs


_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(name: str) -> str:
    """A parameter name without FSDP / activation-checkpointing / compile wrapper components."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def parameter_pairs(reference, check_shapes: bool = True) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, policy parameter, reference parameter) for every parameter the sync of ``reference`` (a
    ``Reference``) mixes (``check_shapes`` False: sharded parameters, whose local shapes may differ;
    ``_sync_fsdp`` checks them)."""
    if reference.adapter:
        return [(f"adapter:{i}", p, r) for i, (r, p) in enumerate(_adapter_pairs(reference.policy))]
    ref = {_clean(n): p for n, p in reference.named_parameters()}  # the frozen model's names (reference.py)
    pol = {_clean(n): p for n, p in reference.policy.named_parameters()}
    if set(ref) != set(pol):
        extra = sorted(set(ref) ^ set(pol))[:3]
        raise ValueError(f"reference.sync: the reference and the policy have different parameters (e.g. {extra}); "
                         "TR-DPO needs a reference of the policy's architecture")
    for name in pol if check_shapes else ():
        if pol[name].shape != ref[name].shape:
            raise ValueError(f"reference.sync: {name} has shape {tuple(pol[name].shape)} in the policy and "
                             f"{tuple(ref[name].shape)} in the reference")
    return [(name, pol[name], ref[name]) for name in pol]


def _mix_(ref: torch.Tensor, pol: torch.Tensor, alpha: float) -> None:
    """ref <- alpha * pol + (1 - alpha) * ref, in place (alpha = 1: an exact copy)."""
    pol = pol.to(ref.dtype)
    if alpha == 1.0:
        ref.copy_(pol)
    else:
        ref.mul_(1.0 - alpha).add_(pol, alpha=alpha)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2 DTensor: this rank's shard


@torch.no_grad()
def sync_reference(reference, alpha: float, fsdp_root: torch.nn.Module | None = None) -> int:
    """Mix the policy into the reference (see the module docstring); returns the number of tensors mixed.
    ``fsdp_root``: the FSDP(1) root wrapper when the module is sharded by FSDP (collective: call on every rank)."""
    pairs = parameter_pairs(reference, check_shapes=fsdp_root is None)
    if fsdp_root is None:
        for _, p, r in pairs:
            _mix_(_local(r.data), _local(p.data), alpha)
    else:
        _sync_fsdp(fsdp_root, pairs, alpha)
    reference.version += 1
    return len(pairs)


def _sync_fsdp(root: torch.nn.Module, pairs, alpha: float) -> None:
    """FSDP1 (``use_orig_params=True``): parameters are views of this rank's shard of their unit's flat
    parameter. A pair in two identical units covers the same elements on every rank: mixed in place. A pair
    inside one unit sits at different offsets: that unit is gathered alone, mixed, written back."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    owner: dict[int, torch.nn.Module] = {}
    for unit in FSDP.fsdp_modules(root):  # outermost first: inner units overwrite their own parameters
        for p in unit.parameters():
            owner[id(p)] = unit
    gather: dict[int, tuple[torch.nn.Module, list]] = {}
    for name, p, r in pairs:
        if owner[id(p)] is owner[id(r)]:
            gather.setdefault(id(owner[id(p)]), (owner[id(p)], []))[1].append((p, r))
        elif p.shape == r.shape:
            _mix_(r.data, p.data, alpha)
        else:
            raise RuntimeError(f"reference.sync under FSDP: {name} is sharded unlike its reference twin")
    units = list(FSDP.fsdp_modules(root))
    for unit in units:  # the same order on every rank: summon_full_params is collective
        if id(unit) in gather:
            with FSDP.summon_full_params(unit, recurse=False, writeback=True):
                for p, r in gather[id(unit)][1]:
                    if p.shape != r.shape:
                        raise RuntimeError(f"reference.sync under FSDP: shapes {tuple(p.shape)} and {tuple(r.shape)}")
                    _mix_(r.data, p.data, alpha)


class ReferenceSync(L.Callback):
    """Calls ``sync_reference`` on ``pl_module.reference`` after every ``every_n_steps``-th optimizer step (the
    module adds it itself through ``configure_callbacks`` when ``reference.sync`` is set)."""

    def __init__(self, alpha: float = 0.6, every_n_steps: int = 512):
        self.alpha, self.every_n_steps = float(alpha), int(every_n_steps)
        self._last = -1

    def on_train_start(self, trainer, pl_module):
        self._last = trainer.global_step  # resumed at a sync step: that sync is already in the checkpoint

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step  # optimizer steps so far; unchanged across accumulation micro-batches
        if step > 0 and step % self.every_n_steps == 0 and step != self._last:
            from lightning.pytorch.strategies import FSDPStrategy

            root = trainer.strategy.model if isinstance(trainer.strategy, FSDPStrategy) else None
            sync_reference(pl_module.reference, self.alpha, fsdp_root=root)
            self._last = step
