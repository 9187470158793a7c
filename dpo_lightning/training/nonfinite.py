"""Skip optimizer steps whose loss or gradient is NaN/inf, on every rank at once.

    guard = NonFiniteGuard(max_consecutive=5)
    guard.observe(loss, batch["index"])          # each micro-batch (no host sync: a flag stays on the device)
    if guard.should_skip(params, step):          # once per optimizer step, on every rank (a collective)
        ...                                      # drop the gradients, do not step the optimizer

At the step boundary each rank folds its micro-batches' loss flags and the finiteness of its gradients'
total norm into one bit; one all-reduce of a ``[world_size]`` vector (each rank's bit) tells every rank
whether any rank saw a non-finite value, and which, so all ranks skip together and nobody waits in a
collective the others never enter. That is one small all-reduce and one host read per optimizer step,
whatever the accumulation. ``max_consecutive`` skips in a row raise ``NonFiniteError`` on every rank.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger("dpo_lightning")


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient; the run stops."""


class NonFiniteGuard:
    """Counts and skips non-finite optimizer steps (see the module docstring).

    Args:
        max_consecutive: skipped steps in a row that stop the run (``NonFiniteError``); at least 1.
        check_gradients: False checks losses only (fp16 with a GradScaler: the scaler skips overflowing
            gradients itself and must see them to lower its scale).
    """

    def __init__(self, max_consecutive: int = 5, check_gradients: bool = True):
        if int(max_consecutive) < 1:
            raise ValueError(f"nonfinite.max_consecutive={max_consecutive}: must be at least 1 (skipped steps in "
                             "a row that stop the run); turn the guard off with nonfinite.guard=false")
        self.max_consecutive, self.check_gradients = int(max_consecutive), check_gradients
        self.skipped = 0       # steps skipped so far (logged as train/skipped_steps)
        self.consecutive = 0   # skipped steps in a row, up to the last step
        self.last_rows: list[int] = []  # this rank's rows of the last skipped step
        self._micro: list[tuple[torch.Tensor, torch.Tensor]] = []  # (loss not finite, row indices) per micro-batch

    def observe(self, loss: torch.Tensor, indices: torch.Tensor) -> None:
        """Record one micro-batch's loss (no host sync)."""
        self._micro.append((~torch.isfinite(loss.detach()), indices.detach()))

    def _local_flag(self, params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        flag = torch.zeros((), dtype=torch.bool, device=device)
        for bad, _ in self._micro:
            flag = flag | bad.to(device)
        grads = [p.grad for p in params if p.grad is not None]
        if self.check_gradients and grads:
            norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)  # one fused norm
            if hasattr(norm, "full_tensor"):  # FSDP2: sharded (DTensor) gradients give a sharded norm
                norm = norm.full_tensor()
            flag = flag | ~torch.isfinite(norm.to(device))
        return flag

    def should_skip(self, params: list[torch.Tensor], step: int, device: torch.device | None = None) -> bool:
        """True when this optimizer step must be skipped on every rank. Call it on every rank once per step."""
        device = device or (params[0].device if params else torch.device("cpu"))
        flag = self._local_flag(params, device)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank = dist.get_rank() if distributed else 0
        votes = torch.zeros(dist.get_world_size() if distributed else 1, device=device)
        votes[rank] = flag.float()
        if distributed:
            dist.all_reduce(votes)  # the one collective: every rank learns which ranks saw a non-finite value
        bad_ranks = votes.nonzero().flatten().tolist()
        micro, self._micro = self._micro, []
        if not bad_ranks:
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        nonfinite_loss = [idx for bad, idx in micro if bool(bad)]
        self.last_rows = sorted(torch.cat(nonfinite_loss or [idx for _, idx in micro] or [torch.zeros(0)])
                                .long().tolist())
        if rank in bad_ranks:
            what = "loss" if nonfinite_loss else "gradient"
            log.warning(f"[rank {rank}] non-finite {what} at step {step}, rows {self.last_rows}: the step is skipped "
                        f"on every rank ({self.consecutive} in a row, {self.skipped} in all)")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient (ranks {bad_ranks}; "
                f"last at step {step}, rows {self.last_rows} on rank {rank}); stopping. Check those data rows, lower "
                "optimizer.lr, keep trainer.gradient_clip_val on, or prefer bf16 to fp16; "
                f"nonfinite.max_consecutive={self.max_consecutive} sets how many skips in a row are tolerated")
        return True

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.consecutive = int(state.get("skipped", 0)), int(state.get("consecutive", 0))
