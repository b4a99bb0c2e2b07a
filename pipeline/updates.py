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
by DeepSpeed over all partitions, so the replicas never diverge.
"""

from __future__ import annotations

import torch

from pipeline.config import Config


class TrainingStalled(RuntimeError):
    """Training cannot make progress (e.g. every update is being skipped)."""


class UpdateGuard:
    def __init__(self, accelerator, scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: Config) -> None:
        self.accelerator, self.scheduler = accelerator, scheduler
        self.grad_clip = cfg.optim.grad_clip
        self.skip_threshold = cfg.objective.skip_threshold
        self.max_consecutive_skips = cfg.objective.max_consecutive_skips
        self.fp16 = cfg.train.mixed_precision == "fp16"
        self.skipped, self.overflows, self.consecutive_skips = 0, 0, 0

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
            self.consecutive_skips = 0
        elif outcome == "overflow":
            self.overflows += 1
        else:
            self.skipped += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.max_consecutive_skips:
                raise TrainingStalled(
                    f"the last {self.consecutive_skips} updates were all skipped (grad norm {grad_norm.item():.4g}, "
                    f"objective.skip_threshold={self.skip_threshold}): the model is not learning. Raise "
                    "objective.skip_threshold, lower optim.lr, or resume from an earlier checkpoint"
                )
