"""A progress bar that counts what bounds the run: optimizer steps when ``max_steps`` does (``max_epochs=-1``).

Lightning's ``RichProgressBar`` draws one bar per epoch titled ``Epoch {n}/{max_epochs - 1}``; a run bounded by
``max_steps`` (our default: ``max_epochs: -1``) then reads ``Epoch 0/-2`` and, with ``leave=true``, leaves one bar
per epoch on screen. ``StepProgressBar`` draws a single ``Step {done}/{max_steps}`` bar for the whole run instead;
an epoch-bounded run gets Lightning's own bar.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


def counts_steps(trainer) -> bool:
    """Whether the run is bounded by optimizer steps rather than epochs."""
    return bool(trainer.max_steps and trainer.max_steps > 0 and trainer.max_epochs in (None, -1))


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` with one ``Step n/max_steps`` bar when ``max_steps`` bounds the run (module docstring)."""

    def _step_description(self, trainer) -> str:
        text = f"Step {trainer.global_step}/{trainer.max_steps} (epoch {trainer.current_epoch})"
        width = len(self.validation_description)
        return f"{text:{width}}" if width > len(text) else text

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not counts_steps(trainer):
            return super().on_train_epoch_start(trainer, pl_module)
        if self.is_disabled:
            return
        self._init_progress(trainer)  # no-op while the live display runs
        if self.progress is not None and self.train_progress_bar_id is None:
            self.train_progress_bar_id = self._add_task(trainer.max_steps, self._step_description(trainer))
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not counts_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:
            self.on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None:
            text = self._step_description(trainer)
            if self.theme.description:
                text = f"[{self.theme.description}]{text}"
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step, description=text)
            self.refresh()
        self._update_metrics(trainer, pl_module)
