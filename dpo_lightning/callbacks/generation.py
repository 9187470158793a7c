"""See what the policy writes: sample, score and judge completions at every validation.

    dpo-train generation.num_prompts=16 generation.max_new_tokens=128 generation.judge=<reward model>
    trainer = L.Trainer(callbacks=[GenerationEvaluation({"num_prompts": 8})])   # plain Lightning

At each validation (not the sanity check) the first ``num_prompts`` held-out prompts of the data module are
sampled from the policy and from the reference (the reference's samples once per run, reused until a TR-DPO
sync moves it; with ``reference.precompute`` the reference weights are loaded for the pass and released),
scored and judged (``generation.py``). Logged: ``gen/kl`` (+ ``gen/kl_stderr``),
``gen/entropy``, ``gen/length``, ``gen/eos_rate``, ``gen/seconds`` (its cost), with a judge ``gen/win_rate`` (+ ``_stderr``), with a
reward-model judge ``gen/reward``; every logger gets the metrics, W&B also a table per step
(``generations/step_<N>``), and ``<dirpath>/step_<N>.jsonl`` holds every sample whatever the logger.

A vision model's held-out prompts are sampled with their images; the JSONL records name each image by its sha256
(``images``), and the W&B table gains an ``image`` column showing it (only when a prompt has images).

Under DDP the prompts are split across ranks and the samples gathered. Under sharded strategies (FSDP,
FSDP2, DeepSpeed ZeRO-3) every rank runs the same number of forwards (``synced_gpus``), FSDP1's root unit
(embeddings, final norm, LM head) is gathered for the duration and each decoder layer gathers itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L

from dpo_lightning.evaluation.generation import (
    GenerationSettings,
    _as_settings,
    gather_records,
    generate_and_score,
    held_out_prompts,
    summarize,
)
from dpo_lightning.evaluation.judges import build_judge
from dpo_lightning.models.vision import text_tokenizer

log = logging.getLogger("dpo_lightning")
COLUMNS = ["step", "prompt", "policy", "reference", "kl", "judge"]


def _sharded_generation(trainer) -> tuple[bool, Any]:
    """(synced_gpus, context to generate in) for the trainer's strategy."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        assert strategy.model is not None  # set up by the fit
        return True, FSDP.summon_full_params(strategy.model, recurse=False, writeback=False)
    if isinstance(strategy, ModelParallelStrategy) or (isinstance(strategy, DeepSpeedStrategy)
                                                       and strategy.zero_stage_3):
        return True, contextlib.nullcontext()
    return False, contextlib.nullcontext()


class GenerationEvaluation(L.Callback):
    """Generation evaluation at every validation (see the module docstring).

    Args:
        settings: ``GenerationSettings`` or a dict of its fields (the ``generation`` config group).
        dirpath: folder of ``step_<N>.jsonl``; None = ``<trainer.default_root_dir>/generations``.
        prompts: prompt texts to use instead of the data module's held-out rows.
        rows: tokenized rows (``prompt_ids``) to take the prompts from instead (``dpo-eval``).
        tokenizer: the tokenizer (a vision model: its processor); None = the data module's (its ``processor``
            when it has one).
        write_samples: write ``<dirpath>/step_<N>.jsonl`` (the samples are also kept in ``last_records``).
    """

    def __init__(self, settings: GenerationSettings | dict | None = None, dirpath: str | None = None,
                 prompts: list[str] | None = None, rows: list[dict] | None = None, tokenizer: Any = None,
                 write_samples: bool = True):
        self.settings = _as_settings(settings)
        self.dirpath, self.prompt_texts, self.tokenizer = dirpath, prompts, tokenizer
        self.rows, self.write_samples = rows, write_samples
        self.last_records: list[dict] = []
        self._warned = False
        self.seconds = 0.0  # wall time spent in generation evaluation, all validations together
        self.judge = build_judge(self.settings.judge, batch_size=self.settings.judge_batch_size)
        self._reference_samples: dict[int, list[list[int]]] = {}
        self._reference_version: int | None = None
        self._done: tuple[int, int] | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_path: Path | None = None

    def _prompts(self, trainer, tokenizer) -> list[tuple[int, list[int]]]:
        n = self.settings.num_prompts
        if self.prompt_texts is not None:
            tok = text_tokenizer(tokenizer)
            return [(i, tok(t)["input_ids"]) for i, t in enumerate(self.prompt_texts[:n])]
        rows = self.rows
        if rows is None and trainer.datamodule is not None:
            rows = getattr(trainer.datamodule, "val_rows", None)
        return held_out_prompts(rows, n) if rows else []

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not self.settings.num_prompts:
            return
        step, version = trainer.global_step, pl_module.reference.version
        if self._done == (step, version):  # this policy was just evaluated (the validation after fit)
            return
        dm = trainer.datamodule  # a vision model's processor (None for text), else the tokenizer
        tokenizer = self.tokenizer or getattr(dm, "processor", None) or getattr(dm, "tokenizer", None)
        prompts = self._prompts(trainer, tokenizer) if tokenizer is not None else []
        if not prompts:
            log.warning("generation evaluation: no held-out prompts (and no `prompts` given): skipped")
            self.settings.num_prompts = 0
            return
        if version != self._reference_version:  # a TR-DPO sync moved the reference: sample it again
            self._reference_samples, self._reference_version = {}, version
        start = time.perf_counter()
        self.last_metrics = self.run(trainer, pl_module, tokenizer, prompts, step)
        self.last_metrics["gen/seconds"] = time.perf_counter() - start  # what this evaluation cost
        self.seconds += self.last_metrics["gen/seconds"]
        for name, value in self.last_metrics.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False)
        self._done = (step, version)

    def run(self, trainer, pl_module, tokenizer, prompts, step: int) -> dict[str, float]:
        rank, world = trainer.global_rank, trainer.world_size
        shard = prompts[rank::world]
        synced, context = _sharded_generation(trainer)
        if synced:  # the same number of forwards on every rank: pad with copies of a prompt (dropped later)
            per_rank = -(-len(prompts) // world)
            shard += [(-1 - j, *prompts[0][1:]) for j in range(per_rank - len(shard))]
        # precomputed reference log-probs: the reference weights are opened for this pass, except under a
        # sharded strategy (every rank would hold the whole reference)
        open_reference = not synced
        with context:
            records, self._reference_samples = generate_and_score(
                pl_module, tokenizer, shard, self.settings, judge=self.judge,
                seed=self.settings.seed + step + 7919 * rank, reference_samples=self._reference_samples,
                synced_gpus=synced, open_reference=open_reference)
        records = [dict(r, step=step) for r in gather_records(records) if r["prompt_index"] >= 0]
        self.last_records = records
        if trainer.is_global_zero:
            if self.write_samples:
                self.last_path = self._write(trainer, records, step)
            self._log_table(trainer, records, step, {p[0]: p[2] for p in prompts if len(p) > 2 and p[2]})
        metrics = summarize(records)
        if "gen/kl" not in metrics and not self._warned:
            why = ("reference.precompute=true under a sharded strategy (the whole reference would be loaded "
                   "on every rank)" if pl_module.reference.is_precomputed else "a reference-free loss")
            log.warning("generation evaluation: no reference model to score against (%s): gen/kl, reference "
                        "samples and the judge are skipped", why)
            self._warned = True
        return metrics

    def _write(self, trainer, records: list[dict], step: int) -> Path:
        from dpo_lightning.files.atomic import atomic_write_text

        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "generations")
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return atomic_write_text(folder / f"step_{step}.jsonl", lines)

    def _log_table(self, trainer, records: list[dict], step: int, images: dict[int, list[bytes]] | None = None,
                   ) -> None:
        """One W&B table per step; ``images`` (prompt index -> image bytes) adds an ``image`` column."""
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        data = [[step, r["prompt"], r["policy"], r["reference"], r["kl"], r["judge"]] for r in records]
        columns = COLUMNS
        if images:
            columns = COLUMNS + ["image"]
            shown = {i: _wandb_image(pics) for i, pics in images.items()}
            data = [row + [shown.get(r["prompt_index"])] for row, r in zip(data, records)]
        for logger in loggers:
            logger.log_table(key=f"generations/step_{step}", columns=columns, data=data)


def _wandb_image(pics: list[bytes]):
    """A ``wandb.Image`` of a prompt's images (several side by side)."""
    import wandb

    from dpo_lightning.data.images import decode

    decoded = [decode(b).convert("RGB") for b in pics]
    if len(decoded) == 1:
        return wandb.Image(decoded[0])
    from PIL import Image

    strip = Image.new("RGB", (sum(im.width for im in decoded), max(im.height for im in decoded)), "white")
    x = 0
    for im in decoded:
        strip.paste(im, (x, 0))
        x += im.width
    return wandb.Image(strip)


def generation_callback(cfg, rows: list[dict], datamodule) -> GenerationEvaluation | None:
    """``dpo-eval``: the callback for a config's ``generation`` node over ``rows``, or None when it is off."""
    node = cfg.get("generation")
    if not node or not int(node.get("num_prompts") or 0):
        return None
    from hydra.utils import instantiate

    return GenerationEvaluation(instantiate(node, _convert_="all"), rows=rows, write_samples=False,
                                tokenizer=getattr(datamodule, "processor", None) or datamodule.tokenizer)


def write_generations(callback: GenerationEvaluation, beside: str | Path) -> Path:
    """Write the callback's last samples to ``generations.jsonl`` in the folder of ``beside``."""
    from dpo_lightning.files.atomic import atomic_write_text

    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in callback.last_records)
    return atomic_write_text(Path(beside).parent / "generations.jsonl", lines)
