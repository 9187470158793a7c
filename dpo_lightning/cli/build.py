"""One construction path for ``dpo-train`` and ``dpo-eval``: the objects a run needs, from a composed config.

    objs = build(cfg)                      # dpo-train: model spec, loss, data module, module, callbacks, trainer
    objs = build(cfg, training=False)      # dpo-eval: the same model spec, loss, data module and module, without
                                           # optimizer, scheduler or NaN guard (it only validates)

The trainer of either is ``build_trainer``: the config's ``trainer`` node with the strategy group
(``build_strategy``) and what the caller adds (callbacks, loggers, checkpoint IO).

Lightning warns about modules in eval mode when training starts; the frozen reference is in eval mode on
purpose, and ``PreferenceLitModule.on_fit_start`` silences exactly that warning (and no other): the one place.
"""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dpo_lightning.callbacks.preemption import PreemptionCheckpoint
from dpo_lightning.callbacks.resume import ResumePoint, RunState, logger_resume_kwargs
from dpo_lightning.config.base import ConfigError
from dpo_lightning.files.atomic import AtomicCheckpointIO
from dpo_lightning.training.module import PreferenceLitModule
from dpo_lightning.training.strategies import build_strategy


def _plain(cfg: DictConfig, key: str) -> Any:
    """``cfg[key]`` as plain containers (interpolations resolved), or None when unset."""
    node = cfg.get(key)
    return OmegaConf.to_container(node, resolve=True) if node else None


def build_module(cfg: DictConfig, *, training: bool = True) -> dict[str, Any]:
    """The model spec, loss, data module (not set up) and ``PreferenceLitModule`` of a composed config;
    ``training=False`` (dpo-eval) leaves out the optimizer, scheduler and non-finite guard."""
    try:  # the settings objects: a value they refuse is a ConfigError, one line (no model is loaded yet)
        model_spec = instantiate(cfg.model, _convert_="all")
        loss = instantiate(cfg.loss, _convert_="all")
        reference = instantiate(cfg.reference, _convert_="all")
        datamodule = instantiate(cfg.data, _partial_=True, _convert_="all")(
            tokenizer=model_spec, paired=loss.paired, kl_pairs=bool(getattr(loss, "needs_kl_pairs", False)))
        fit: dict[str, Any] = {}
        if training:
            fit = {"optimizer": instantiate(cfg.optimizer, _convert_="all"),
                   "scheduler": instantiate(cfg.scheduler, _convert_="all"),
                   "nonfinite": OmegaConf.to_container(cfg.nonfinite) if cfg.get("nonfinite") else None}
    except (ValueError, TypeError, InstantiationException) as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        if not isinstance(cause, (ValueError, TypeError)):
            raise
        raise ConfigError(str(cause)) from err
    module = PreferenceLitModule(model_spec, loss=loss, reference=reference, peft=_plain(cfg, "peft"), **fit,
                                 **(_plain(cfg, "engine") or {}))
    return {"model_spec": model_spec, "loss": loss, "datamodule": datamodule, "module": module}


def build_trainer(cfg: DictConfig, **kwargs: Any):
    """``lightning.Trainer`` from ``cfg.trainer`` with the strategy group; ``kwargs`` go to the Trainer."""
    return instantiate(cfg.trainer, strategy=build_strategy(cfg.get("strategy")), **kwargs)


def build(cfg: DictConfig, *, with_trainer: bool = True, training: bool = True,
          resume: ResumePoint | None = None) -> dict[str, Any]:
    """Instantiate every object a run needs from a composed config (no training). With ``with_trainer``
    (training only): also the callbacks (+ the preemption checkpoint), loggers and the trainer, which writes
    its checkpoints atomically. ``resume`` (a resumed run): the loggers continue its logs."""
    out = build_module(cfg, training=training)
    if with_trainer and training:
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
        if cfg.get("preemption", True):  # SIGTERM / SLURM requeue: checkpoint at the next step, every rank, exit
            callbacks.append(PreemptionCheckpoint(f"{cfg.paths.output_dir}/checkpoints"))
        callbacks.append(RunState())  # the W&B run id and the "before" validation travel in checkpoints
        loggers = [instantiate(c, **logger_resume_kwargs(c, resume)) for c in (cfg.get("logger") or {}).values() if c]
        trainer = build_trainer(cfg, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()])
        out.update(callbacks=callbacks, loggers=loggers, trainer=trainer)
    return out
