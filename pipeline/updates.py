"""The optimizer update of one step, and what happens when it should not happen.

Three outcomes, told apart because they mean different things:

* ``stepped``: clipped, applied, the learning-rate schedule advances, the EMA follows;
* ``skipped``: the gradient norm was not finite or above ``objective.skip_threshold`` (VDVAE's
  update skipping): a sign of instability, counted, and a run whose last
  ``objective.max_consecutive_skips`` updates were all skipped stops instead of spinning;
* ``overflow``: under fp16, the loss scale was too high and the gradients overflowed. That is the
  dynamic loss scaler doing its job (it drops the step and halves the scale), not instability:
  counted apart and never fed to the stall guard.

Every rank takes the same decision: the norm is computed from all-reduced gradients (DDP) or
by DeepSpeed over all partitions, so the replicas never diverge. A non-finite gradient on one
rank makes the reduced one non-finite on every rank, so all of them skip that update.

A skipped update leaves the weights, the optimizer state (AdamW's moments and its step counter)
and the EMA bitwise as they were, and the learning-rate schedule where it was (it counts applied
updates); the trainer's step counter still advances, as the batch was consumed.

Skips of a non-finite norm are counted apart too (``nonfinite``). With
``train.rollback_after_nonfinite`` = K, K of them in a row make ``rollback_due`` true and the
trainer rolls back to its last checkpoint (``Trainer.roll_back``); once ``train.max_rollbacks``
rollbacks have been made, the next one needed stops the run (``TrainingDiverged``, exit 4).
Both counters of updates in a row start again at zero after a rollback. K is below
``objective.max_consecutive_skips`` (the config checks it), so a run of non-finite updates meets
the rollback first; the stall stop still ends runs of skips for a large finite norm.
"""

from __future__ import annotations

import torch

from pipeline.config import Config


class TrainingStalled(RuntimeError):
    """Training cannot make progress (e.g. every update is being skipped)."""


class TrainingDiverged(TrainingStalled):
    """Non-finite updates in a row once more after ``train.max_rollbacks`` rollbacks."""


class UpdateGuard:
    def __init__(self, accelerator, scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: Config) -> None:
        self.accelerator, self.scheduler = accelerator, scheduler
        self.grad_clip = cfg.optim.grad_clip
        self.skip_threshold = cfg.objective.skip_threshold
        self.max_consecutive_skips = cfg.objective.max_consecutive_skips
        self.rollback_after, self.max_rollbacks = cfg.train.rollback_after_nonfinite, cfg.train.max_rollbacks
        self.fp16 = cfg.train.mixed_precision == "fp16"
        self.skipped, self.overflows, self.consecutive_skips = 0, 0, 0
        self.nonfinite, self.consecutive_nonfinite, self.rollbacks = 0, 0, 0

    @property
    def rollback_due(self) -> bool:
        return 0 < self.rollback_after <= self.consecutive_nonfinite

    @property
    def diverging(self) -> bool:
        """Non-finite updates in a row that may end in a rollback: a checkpoint written now would
        hold the weights that diverged (and could prune an older, good one)."""
        return self.rollback_after > 0 and self.consecutive_nonfinite > 0

    def begin_rollback(self, step: int) -> int:
        """Counts a rollback and returns the newest step it may go back to (the one before the
        non-finite updates began); TrainingDiverged when ``train.max_rollbacks`` are spent."""
        streak = self.consecutive_nonfinite
        if self.rollbacks >= self.max_rollbacks:
            raise TrainingDiverged(
                f"{streak} updates in a row with a non-finite gradient norm up to step {step}, after "
                f"{self.rollbacks} rollback(s) already (train.max_rollbacks={self.max_rollbacks}): the run diverges "
                "whatever the data. Its newest checkpoint is left as it was; lower optim.lr, raise "
                "objective.kl_warmup_steps or check the data before resuming"
            )
        self.rollbacks += 1
        self.consecutive_nonfinite = self.consecutive_skips = 0
        return step - streak

    def step(self, model: torch.nn.Module, optimizer) -> tuple[torch.Tensor, str]:
        """DDP or one process, after the last micro-batch's backward: clip, then decide."""
        scaler = self.accelerator.scaler
        if scaler is not None:
            # Unscaled here rather than inside Accelerate's clip_grad_norm_, which does it only
            # for its own fp16 mode: the scaler, wherever it came from, must see these gradients.
            scaler.unscale_(optimizer.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        else:
            grad_norm = self.accelerator.clip_grad_norm_(model.parameters(), self.grad_clip)
        finite = bool(torch.isfinite(grad_norm))
        if scaler is not None and not finite:
            optimizer.step()  # the scaler sees the inf, drops the update and lowers its scale
            outcome = "overflow"
        elif not finite or 0 < self.skip_threshold < grad_norm.item():
            if scaler is not None:
                scaler.update()  # the gradients were unscaled for the norm: close that scaler step
            outcome = "skipped"
        else:
            optimizer.step()
            outcome = "overflow" if optimizer.step_was_skipped else "stepped"
        optimizer.zero_grad(set_to_none=True)
        self._record(outcome, grad_norm)
        return grad_norm, outcome

    def after_deepspeed_step(self, engine, skipped_before: int) -> tuple[torch.Tensor, str]:
        """DeepSpeed clipped and stepped inside backward(), and dropped the step itself when the
        norm was not finite (its overflow check; under fp16 also halving the loss scale)."""
        norm = engine.get_global_grad_norm()
        grad_norm = torch.tensor(float("inf") if norm is None else float(norm), device=self.accelerator.device)
        dropped = engine.skipped_steps > skipped_before
        outcome = ("overflow" if self.fp16 else "skipped") if dropped else "stepped"
        self._record(outcome, grad_norm)
        return grad_norm, outcome

    def _record(self, outcome: str, grad_norm: torch.Tensor) -> None:
        if outcome == "stepped":
            self.scheduler.step()
            self.consecutive_skips = self.consecutive_nonfinite = 0
        elif outcome == "overflow":
            self.overflows += 1
        else:
            self.skipped += 1
            self.consecutive_skips += 1
            if torch.isfinite(grad_norm):  # skipped for a large norm: not a run of non-finite ones
                self.consecutive_nonfinite = 0
            else:
                self.nonfinite += 1
                self.consecutive_nonfinite += 1
            if self.consecutive_skips >= self.max_consecutive_skips:
                raise TrainingStalled(
                    f"the last {self.consecutive_skips} updates were all skipped (grad norm {grad_norm.item():.4g}, "
                    f"objective.skip_threshold={self.skip_threshold}): the model is not learning. Raise "
                    "objective.skip_threshold, lower optim.lr, or resume from an earlier checkpoint"
                )
