"""An exponential moving average of the weights: what evaluation, samples and export use."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        # Float32 whatever the weights are (bf16 under DeepSpeed's bf16): an average of small
        # steps rounded to bf16 every step would stop moving.
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}  # fmt: skip

    def decay_at(self, step: int) -> float:
        # Warm-up: with 0.9999 from step 0, the average would sit at the initial weights for
        # thousands of steps, and a short run would evaluate an untrained model.
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        keep = self.decay_at(step)
        averaged, live = [], []
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                averaged.append(self.shadow[key])
                live.append(value.detach().float())
            else:
                self.shadow[key].copy_(value)
        # One call for every tensor: a lerp_ per tensor from Python costs more than the
        # arithmetic for models of hundreds of small tensors (benchmarks/README.md).
        torch._foreach_lerp_(averaged, live, 1 - keep)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            raise KeyError(f"EMA state does not match the model: {sorted(state.keys() ^ self.shadow.keys())[:5]}")
        for key, value in state.items():
            self.shadow[key].copy_(value)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with the averaged weights inside the block, its own weights after."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(live)
