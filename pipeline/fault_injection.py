"""For fault tests only: a non-finite loss or gradient made on purpose at chosen steps (``faults.*``).

Real runs leave ``faults.inject_nonfinite_steps`` empty; then ``due`` is a lookup in an empty set
and nothing else here runs. Tests use it to show what the update guard and the rollback do with
a NaN or an infinity that appears on one rank only (pipeline/updates.py, tests/test_nonfinite.py).
"""

from __future__ import annotations

import logging

import torch

from pipeline.config import FaultsConfig

log = logging.getLogger(__name__)


class NonfiniteInjection:
    def __init__(self, cfg: FaultsConfig, rank: int, world_size: int) -> None:
        self.rank = rank
        self.steps = set(cfg.inject_nonfinite_steps) if rank in cfg.inject_ranks else set()
        self.into, self.value = cfg.inject_into, float(cfg.inject_value)
        if cfg.inject_nonfinite_steps and rank == 0 and not any(r < world_size for r in cfg.inject_ranks):
            log.warning("faults.inject_ranks=%s: no such rank among %d process(es), nothing will be injected",
                        cfg.inject_ranks, world_size)  # fmt: skip

    def due(self, step: int, micro_batch: int) -> bool:
        """Whether to poison this micro-batch: the first one of a listed step, the first time only
        (a step computed again after a rollback sees other data: the fault was transient)."""
        if micro_batch == 0 and step in self.steps:
            self.steps.discard(step)
            return True
        return False

    def poison(self, loss: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
        """The loss to back-propagate: made non-finite itself, or left finite while the first
        parameter's gradient is replaced as backward computes it. That is before DDP's all-reduce
        (which hooks the accumulated gradient) or DeepSpeed's reduction: a fault on one rank's
        backward, which the reduction hands to every rank."""
        log.warning("faults.inject_nonfinite_steps: making the %s non-finite (%s) on rank %d",
                    self.into, self.value, self.rank)  # fmt: skip
        if self.into == "loss":
            return loss * self.value  # (not +: adding a constant would leave the gradient finite)
        parameter = next(p for p in model.parameters() if p.requires_grad)
        handle = None

        def replace(grad: torch.Tensor) -> torch.Tensor:
            handle.remove()  # once: the next backward is clean
            return torch.full_like(grad, self.value)

        handle = parameter.register_hook(replace)
        return loss
