"""The latent noise of the reparameterisation, the same whatever the number of processes.

A hierarchical VAE draws noise for every latent group of every image. If each process drew
its own (the usual ``seed + rank``), a run on 2 processes would train on other noise than the
same run on 1 process with the same global batch, and no test could show that data-parallel
training computes what single-process training does. Instead, every process keeps the same
generator state and draws the noise of the *whole* optimizer step (all processes, all
accumulation micro-batches) for each group, then keeps its own slice. The n-th image of an
optimizer step's global batch then gets the same noise on 1 GPU, on 8, or on 1 with 8
accumulation steps, and training is invariant to the layout up to the order of float sums.

The cost is drawing ``slices`` times the noise a process uses: a few hundred MB of random
numbers per step for a 32x32 model on 8 GPUs, small next to the convolutions. Evaluation,
sampling and the encoder run with the default single slice and draw exactly what they use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# (this process's slice, number of slices): (micro-batch x world size + rank, accumulation x world size)
_slice: tuple[int, int] = (0, 1)


@contextmanager
def batch_slice(index: int, count: int) -> Iterator[None]:
    """Inside the block, noise is drawn for ``count`` equal slices of which this process keeps
    slice ``index`` (the trainer's micro-batch ``m`` of ``A`` on rank ``r`` of ``W``:
    ``index = m * W + r``, ``count = A * W``)."""
    global _slice
    if not 0 <= index < count:
        raise ValueError(f"slice {index} of {count}")
    previous, _slice = _slice, (index, count)
    try:
        yield
    finally:
        _slice = previous


def standard_normal_like(x: torch.Tensor) -> torch.Tensor:
    """N(0, 1) noise shaped like ``x`` (batch first): this process's slice of the whole step's."""
    index, count = _slice
    if count == 1:
        # Not randn_like, which draws in x's memory order: channels-last activations
        # (train.channels_last) would get the same numbers at other places, hence other noise.
        return torch.randn(x.shape, dtype=x.dtype, device=x.device)
    n = x.shape[0]
    full = torch.randn((count * n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    return full[index * n : (index + 1) * n]


class StepNoise:
    """The trainer's side: each micro-batch of an optimizer step starts from the generator
    state the step started with and keeps its own slice, so after the last micro-batch the
    generator stands where one un-accumulated draw would have left it."""

    def __init__(self, rank: int, world_size: int, accumulation: int, device: torch.device) -> None:
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation
        self.device = device
        self._start: torch.Tensor | None = None

    def _state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _restore(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextmanager
    def micro_batch(self, micro: int) -> Iterator[None]:
        if self.accumulation > 1:
            if micro == 0:
                self._start = self._state()
            else:
                self._restore(self._start)
        with batch_slice(micro * self.world_size + self.rank, self.accumulation * self.world_size):
            yield
