"""``PreferenceLitModule``: a policy, a frozen reference and a registry loss, as one LightningModule.

    from dpo_lightning import PreferenceLitModule, PreferenceDataModule, get_loss
    module = PreferenceLitModule("gpt2", loss=get_loss("sigmoid", beta=0.1))
    lightning.Trainer(max_steps=100).fit(module, datamodule=PreferenceDataModule("pairs.jsonl", "gpt2"))

Works with any Lightning strategy, precision, callback or logger; Hydra is not needed here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning.pytorch.utilities.types import OptimizerLRScheduler

from dpo_lightning.engine.logprobs import (
    SeqLogps,
    compile_backbone,
    enable_gradient_checkpointing,
    sequence_logps,
)
from dpo_lightning.engine.probe import check_images, summary, verify
from dpo_lightning.losses.registry import Loss, LossOutput, get_loss
from dpo_lightning.models.hf import ModelSpec, load_causal_lm
from dpo_lightning.models.peft import apply_peft
from dpo_lightning.models.quirks import engine_plan
from dpo_lightning.models.vision import freeze_vision_tower, is_vision_model
from dpo_lightning.reference.reference import Reference
from dpo_lightning.reference.spec import Mode, ReferenceSpec
from dpo_lightning.reference.sync import ReferenceSync
from dpo_lightning.training.heldout import OBJECTIVE, HeldOutRecorder
from dpo_lightning.training.inputs import build_inputs
from dpo_lightning.training.nonfinite import NonFiniteGuard
from dpo_lightning.training.optim import OptimizerSpec, SchedulerSpec


def _as(kind, value):
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    if isinstance(value, str) and kind is ModelSpec:
        return ModelSpec(name_or_path=value)
    return kind(**dict(value))


class PreferenceLitModule(L.LightningModule):
    """Preference optimization of ``model`` against a frozen reference.

    ``self.reference`` is the ``Reference`` (``reference/reference.py``): its mode, model or adapter, TR-DPO
    state and precompute cache; everything that needs the reference asks it.

    Args:
        model: ``ModelSpec``, a dict of its fields, or a hub id / local path.
        loss: a ``Loss`` from ``get_loss``, a registry name, or ``{"name": ..., **hparams}``.
        reference: ``ReferenceSpec`` or dict (default: frozen copy of the initial policy).
        optimizer, scheduler: ``OptimizerSpec`` / ``SchedulerSpec`` or dicts.
        chunk_size: rows of the LM head computed at once (memory vs. speed).
        full_logits: use the plain path (full logits, for exactness checks); slower, more memory.
        peft: adapter settings (``{"method": "lora", "r": 16, ...}``, see ``models/peft.py``); None = full
            fine-tuning. With adapters the reference defaults to the policy with adapters disabled.
        gradient_checkpointing: recompute decoder-layer activations in backward (less memory, ~1/3 slower).
        recompute_pointwise: keep only the matmul and attention outputs of the policy's decoder layers and
            recompute their elementwise operators in backward (exact; ~45% less activation memory for a few
            percent of time; ``engine/recompute.py``). Off where whole layers are recomputed or compiled.
        compile: ``torch.compile`` the decoder layers of policy and reference (same results, faster steps
            after a one-time compilation).
        softmax_cache_mb: MiB of LM-head softmax kept from forward to backward, so those tokens skip the
            logits recompute (0 = always recompute; see ``engine/logprobs.py``).
        verify: before the first step, probe the fast path against the model's own forward and fall back to
            the exact path where they differ (``engine/probe.py``); False trusts ``models/quirks.py`` alone.
        router_aux_loss_coef: weight of an MoE policy's router load-balancing loss added to the loss (TRL's
            ``router_aux_loss_coef``); None = the model config's own (0 or no MoE: none).
        nonfinite: ``{"guard": bool, "max_consecutive": int}``: skip an optimizer step whose loss or gradient
            is NaN/inf on any rank, and stop after ``max_consecutive`` in a row (``nonfinite.py``).
    """

    def __init__(self, model: ModelSpec | dict | str | None = None, loss: Loss | dict | str = "sigmoid",
                 reference: ReferenceSpec | dict | None = None, optimizer: OptimizerSpec | dict | None = None,
                 scheduler: SchedulerSpec | dict | None = None, chunk_size: int = 1024, full_logits: bool = False,
                 peft: dict | None = None, gradient_checkpointing: bool = False, compile: bool = False,
                 softmax_cache_mb: float = 512, verify: bool = True, router_aux_loss_coef: float | None = None,
                 nonfinite: dict | None = None, recompute_pointwise: bool = True) -> None:
        super().__init__()
        self.model_spec = _as(ModelSpec, model)
        if isinstance(loss, str):
            loss = get_loss(loss)
        elif isinstance(loss, dict):
            loss = get_loss(**loss)
        self.loss_fn: Loss = loss
        reference_spec = _as(ReferenceSpec, reference)
        self.optimizer_spec = _as(OptimizerSpec, optimizer)
        self.scheduler_spec = _as(SchedulerSpec, scheduler)
        self.chunk_size, self.full_logits = chunk_size, full_logits
        self.gradient_checkpointing, self.compile, self.softmax_cache_mb = gradient_checkpointing, compile, softmax_cache_mb  # type: ignore[method-assign, assignment]  # a flag in LightningModule.compile's place
        self.recompute_pointwise = recompute_pointwise
        self.save_hyperparameters({
            "model": asdict(self.model_spec), "loss": {"name": loss.name, **loss.hparams},
            "reference": asdict(reference_spec), "optimizer": asdict(self.optimizer_spec),
            "scheduler": asdict(self.scheduler_spec), "chunk_size": chunk_size, "full_logits": full_logits,
            "peft": dict(peft) if peft else None, "gradient_checkpointing": gradient_checkpointing,
            "compile": compile, "softmax_cache_mb": softmax_cache_mb, "verify": verify,
            "router_aux_loss_coef": router_aux_loss_coef, "nonfinite": dict(nonfinite or {}),
            "recompute_pointwise": recompute_pointwise,
        })
        self.engine_verify, self._engine_checked = verify, False
        nonfinite = {"guard": True, **dict(nonfinite or {})}
        self.nonfinite = NonFiniteGuard(nonfinite.get("max_consecutive", 5)) if nonfinite["guard"] else None
        self.peft_settings = dict(peft) if peft else None
        policy = load_causal_lm(self.model_spec)
        if self.model_spec.freeze_vision and is_vision_model(policy):
            freeze_vision_tower(policy)  # train the language model only (models/vision.py says why)
        self.policy = apply_peft(policy, self.peft_settings)
        self.policy_plan = engine_plan(self.policy, router_aux_loss_coef)  # models/quirks.py
        # registered as ``reference``: its weights' keys are ``reference.*`` (Reference.PREFIX)
        self.reference = Reference.build(reference_spec, loss, self.policy, self.model_spec)
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)
        if compile:
            for m in (self.policy, self.reference.module):
                if m is not None:
                    compile_backbone(m)
        self._policy_trained = False
        self.policy.train()
        self.strict_loading = False  # a frozen reference's weights are not checkpointed (Reference.on_save_checkpoint)
        self.loss_state: dict[str, Any] = {}
        self.heldout = HeldOutRecorder()  # per-row held-out values of the last validation (heldout.py)
        # pi_0 of val/pref_loglik: "initial" = the policy before training (a validation before it, or a reference
        # that is the initial weights); "reference" = the reference (dpo-eval of an export: its training's start)
        self.pref_baseline = "initial"

    # ---------------------------------------------------------------- forward
    def verify_engine(self) -> None:
        """Once, before the first forward: probe the fast path of the policy and the reference against their own
        forward (``engine/probe.py``) and print one line when any of them falls back to an exact path."""
        if self._engine_checked:
            return
        self._engine_checked = True
        kw: dict[str, Any] = {"chunk_size": self.chunk_size, "probe": self.engine_verify, "full_logits": self.full_logits}
        lines = verify(self.policy, label="policy", adapter_states=self.reference.mode is Mode.ADAPTER, aux=True, **kw)
        if self.reference.module is not None:
            lines += verify(self.reference.module, label="reference", **kw)
        line = summary(lines)
        if line:
            _print_once(line)

    def verify_images(self, batch: dict[str, Any]) -> None:
        """Once, on the first batch with images: its prefix-sharing layout against the model's own forward on
        the plain rows, for the policy and the reference (``engine/probe.py``); one line when images step aside."""
        if not self.engine_verify or not batch.get("vision"):
            return
        kw: dict[str, Any] = {"chunk_size": self.chunk_size, "full_logits": self.full_logits}
        lines = check_images(self.policy, batch, label="policy", **kw)
        if self.reference.module is not None:
            lines += check_images(self.reference.module, batch, label="reference", **kw)
        line = summary(lines)
        if line:
            _print_once(line)

    def policy_logps(self, batch: dict[str, Any]) -> SeqLogps:
        return sequence_logps(self.policy, batch, batch["num_sequences"], chunk_size=self.chunk_size,
                              full_logits=self.full_logits, softmax_cache_mb=self.softmax_cache_mb,
                              want_sq=bool(self.loss_fn.hparams.get("use_weighting")), aux_loss=True)

    def reference_logps(self, batch: dict[str, Any]) -> SeqLogps | None:
        """Reference log-probs for the batch, or None when they come precomputed or are not needed."""
        return self.reference.logps(batch, chunk_size=self.chunk_size, full_logits=self.full_logits)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[LossOutput, dict[str, torch.Tensor]]:
        """Loss output and the logged metrics (TRL names, without split prefix) for one batch."""
        out, metrics, _ = self._compute(batch)
        return out, metrics

    def _compute(self, batch: dict[str, Any]):
        """``compute_loss`` and the policy's and live reference's log-probs (``SeqLogps`` / None)."""
        self.verify_engine()
        self.verify_images(batch)
        reference = self.reference_logps(batch)  # first: its temporaries are freed before the policy's graph
        policy = self.policy_logps(batch)
        inputs, metrics = build_inputs(self.loss_fn, policy, reference, batch)
        inputs.state = self.loss_state
        out = self.loss_fn(inputs)
        if policy.aux_loss is not None:  # MoE: TRL 1.16 adds router_aux_loss_coef * aux_loss to the policy loss
            assert self.policy_plan.aux is not None  # an aux loss is computed only under the plan's aux
            out.loss = out.loss + self.policy_plan.aux["coef"] * policy.aux_loss
            metrics["aux_loss"] = policy.aux_loss.detach()
        metrics["loss"] = out.loss.detach()
        for name, rewards in (("chosen", out.chosen_rewards), ("rejected", out.rejected_rewards)):
            if rewards.numel():  # unpaired batches may hold only desirable (or undesirable) rows
                metrics[f"rewards/{name}"] = rewards.mean()
        if self.loss_fn.paired:
            metrics["rewards/accuracies"] = (out.chosen_rewards > out.rejected_rewards).float().mean()
            metrics["rewards/margins"] = (out.chosen_rewards - out.rejected_rewards).mean()
        elif "pair" in batch:  # unpaired rows split from pairs: accuracy over pairs complete in the batch
            accuracy = pair_accuracy(out, batch["label"].bool(), batch["pair"])
            if accuracy is not None:
                metrics["rewards/accuracies"] = accuracy
        metrics.update({k: v.detach() for k, v in out.metrics.items()})
        return out, metrics, (policy, reference)

    # ---------------------------------------------------------------- reference precompute
    def setup(self, stage: str) -> None:
        """Selective recomputation of the policy's layers (unless the strategy checkpoints whole layers), then
        ``reference.precompute``: fill the datamodule's rows with cached reference log-probs (computed
        once with the initial weights, before any dataloader exists; ``reference/cache.py``)."""
        strategy = getattr(self._trainer, "strategy", None)
        whole_layers = self.gradient_checkpointing or self.compile or getattr(strategy, "_checkpoint_layers", False)  # type: ignore[truthy-function]
        # DeepSpeed gathers ZeRO-3 partitions in its own module hooks: untested with recomputation, so not used
        if self.recompute_pointwise and not whole_layers and "DeepSpeed" not in type(strategy).__name__:
            from dpo_lightning.engine.recompute import enable_selective_recompute

            enable_selective_recompute(self.policy)
        if self.reference.is_precomputed:
            self.verify_engine()  # the cached values come from the same engine
            infos = self.reference.precompute(self.trainer.datamodule, trainer=self._trainer,  # type: ignore[attr-defined]
                                              chunk_size=self.chunk_size, policy_trained=self._policy_trained)
            for info in infos:
                how = "loaded from" if info["hit"] else f"computed in {info['seconds']:.1f}s, saved to"
                print(f"[dpo_lightning] reference log-probs for {info['rows']} rows {how} {info['path']}")

    def on_fit_start(self) -> None:
        """Lightning warns about modules in eval mode when training starts; the frozen reference is in eval mode
        on purpose, so its warning (exactly that count, only when nothing else is in eval mode) is silenced
        until training starts. Any other module left in eval mode still gets the warning."""
        frozen = [n for n, m in self.named_modules() if not m.training]
        if frozen and all(n == "reference" or n.startswith("reference.") for n in frozen):
            warnings.filterwarnings("ignore", message=rf"Found {len(frozen)} module\(s\) in eval mode at the start")
            self._eval_warning_filter: Any = warnings.filters[0]

    def on_train_start(self) -> None:
        self._policy_trained = True
        loader: Any = self.trainer.train_dataloader  # NLL token means invariant to accumulation (data/accumulation.py)
        if hasattr(loader, "accumulate"):
            loader.accumulate = int(self.trainer.accumulate_grad_batches)
        flt = getattr(self, "_eval_warning_filter", None)
        if flt is not None and flt in warnings.filters:
            warnings.filters.remove(flt)  # type: ignore[attr-defined]  # a list at runtime
            getattr(warnings, "_filters_mutated", lambda: None)()  # what filterwarnings itself calls
        self._eval_warning_filter = None

    def configure_callbacks(self) -> list[L.Callback]:
        """TR-DPO (``reference.sync``): the callback that moves the reference (``reference/sync.py``)."""
        if self.reference.sync:
            alpha, every = self.reference.sync
            return [ReferenceSync(alpha=alpha, every_n_steps=every)]
        return []

    # ---------------------------------------------------------------- steps
    def _batch_size(self, batch) -> int:
        return int(batch["index"].numel())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out, metrics = self.compute_loss(batch)
        loss_value = metrics.pop("loss")
        if self.nonfinite is not None:
            self.nonfinite.observe(out.loss, batch["index"])
            metrics["skipped_steps"] = float(self.nonfinite.skipped)  # type: ignore[assignment]  # a Python number: Lightning places it
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False,
                      batch_size=self._batch_size(batch))
        # the loss is averaged over ranks (DDP/FSDP/DeepSpeed): the logged value is the global batch's
        self.log("train/loss", loss_value, prog_bar=True, batch_size=self._batch_size(batch), sync_dist=True)
        return out.loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out, metrics, (policy, reference) = self._compute(batch)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, on_step=False, on_epoch=True,
                      sync_dist=True, batch_size=self._batch_size(batch))
        if not self.trainer.sanity_checking:
            self._record_heldout(batch, out, policy, reference)

    # ---------------------------------------------------------------- per-row held-out values (heldout.py)
    def _record_heldout(self, batch, out: LossOutput, policy: SeqLogps, reference: SeqLogps | None) -> None:
        B = self._batch_size(batch)
        if not self.loss_fn.paired:
            self.heldout.observe(batch["index"], policy=None, reference=None,
                                 losses=out.losses if out.losses.numel() == B else None, margins=None)
            return
        pol = torch.stack([policy.logps[:B], policy.logps[B:2 * B]], dim=1)  # [B, 2] sums over completion tokens
        ref = None
        if reference is not None:
            ref = torch.stack([reference.logps[:B], reference.logps[B:2 * B]], dim=1)
        elif "ref_chosen_logps" in batch:  # precomputed sums
            ref = torch.stack([batch["ref_chosen_logps"], batch["ref_rejected_logps"]], dim=1)
        self.heldout.observe(batch["index"], policy=pol, reference=ref,
                             losses=out.losses if out.losses.numel() == B else None,
                             margins=out.chosen_rewards - out.rejected_rewards)

    def on_validation_epoch_start(self) -> None:
        self.heldout.start()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        ref = self.reference
        initial = ref.mode in (Mode.COPY, Mode.ADAPTER, Mode.CACHED) and not ref.spec.separate and not ref.moves
        untrained = not self._policy_trained
        if self.pref_baseline == "reference":  # dpo-eval: the model evaluated is the trained one, pi_0 the reference
            untrained, initial = False, True
        self.heldout.finish(untrained=untrained, reference_is_initial=initial)
        stats = self.heldout.summary().get(OBJECTIVE)
        if stats is not None:  # already gathered from every rank: the same value everywhere
            self.log(OBJECTIVE, stats["mean"], on_step=False, on_epoch=True, sync_dist=False)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        _, metrics = self.compute_loss(batch)
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, on_step=False, on_epoch=True,
                      sync_dist=True, batch_size=self._batch_size(batch))

    # ---------------------------------------------------------------- optim
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Callable[[], Any] | None = None) -> None:
        """Step, then drop the gradients at once (as Hugging Face's Trainer does) rather than at the next
        backward, so they do not sit in memory through the next forward.

        With the non-finite guard, the closure (forward + backward of the step's last micro-batch) runs first;
        a step whose loss or gradient is NaN/inf on any rank then drops its gradients on every rank instead
        of stepping (``nonfinite.py``). The step still counts toward ``max_steps``."""
        guard = self.nonfinite if optimizer_closure is not None and self._guard_applies() else None
        if guard is not None:
            assert optimizer_closure is not None  # the guard applies only with a closure
            loss = optimizer_closure()
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if guard.should_skip(params, self.trainer.global_step, self.device):
                optimizer.zero_grad(set_to_none=True)
                return
            optimizer_closure = lambda: loss  # noqa: E731  (already run: the precision plugin calls it again)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def _guard_applies(self) -> bool:
        """The guard drives the step itself, except under DeepSpeed (its engine owns the step and the
        gradients); with fp16's GradScaler it checks losses only (the scaler handles gradient overflow)."""
        if self.nonfinite is None or type(self.trainer.strategy).__name__ == "DeepSpeedStrategy":
            return False
        self.nonfinite.check_gradients = getattr(self.trainer.precision_plugin, "scaler", None) is None
        return True

    def configure_optimizers(self) -> OptimizerLRScheduler:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_spec.build(params)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        scheduler = self.scheduler_spec.build(optimizer, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The reference's part (``Reference.on_save_checkpoint``: a frozen one is dropped, a moving one kept),
        the loss's running state and the non-finite guard's counters."""
        self.reference.on_save_checkpoint(checkpoint)
        checkpoint["loss_state"] = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in self.loss_state.items()}
        if self.nonfinite is not None:
            checkpoint["nonfinite"] = self.nonfinite.state_dict()
        if self.heldout.baseline_source:  # the initial policy's held-out log-probs: a resumed run has no "before"
            checkpoint["heldout_baseline"] = {"rows": [[i, *v] for i, v in self.heldout.baseline.items()],
                                              "source": self.heldout.baseline_source}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check a plain checkpoint holds the policy, restore the loss's running state and the reference's part
        (``Reference.on_load_checkpoint``). DeepSpeed hands over its client state without ``state_dict``: its
        engine has loaded the weights itself."""
        weights = checkpoint.get("state_dict")
        missing = [] if weights is None else [k for k in self.state_dict() if k.startswith("policy.") and k not in weights]
        if missing:
            raise KeyError(f"checkpoint lacks policy weights, e.g. {missing[:3]}; was it saved by this module?")
        self.loss_state.update(checkpoint.get("loss_state", {}))
        if self.nonfinite is not None:
            self.nonfinite.load_state_dict(checkpoint.get("nonfinite", {}))
        if checkpoint.get("heldout_baseline"):
            base = checkpoint["heldout_baseline"]
            self.heldout.baseline = {int(i): (float(c), float(r)) for i, c, r in base["rows"]}
            self.heldout.baseline_source = base["source"]
        self.reference.on_load_checkpoint(checkpoint)


@rank_zero_only
def _print_once(line: str) -> None:
    print(line, flush=True)


def pair_accuracy(out: LossOutput, labels: torch.Tensor, pair: torch.Tensor) -> torch.Tensor | None:
    """Share of pairs whose desirable row out-rewards its undesirable row, over pairs with both rows here.

    Unpaired losses return the rewards of desirable rows then undesirable rows, each in batch order.
    """
    rewards = out.chosen_rewards.new_empty(labels.numel())
    rewards[labels], rewards[~labels] = out.chosen_rewards, out.rejected_rewards
    good, bad = labels.nonzero(as_tuple=True)[0], (~labels).nonzero(as_tuple=True)[0]
    gi, bi = (pair[good][:, None] == pair[bad][None, :]).nonzero(as_tuple=True)  # matching pair ids
    if gi.numel() == 0:
        return None
    return (rewards[good[gi]] > rewards[bad[bi]]).float().mean()
