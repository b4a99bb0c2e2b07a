"""Who reads what, in which order: the epoch plan, computed identically on every rank and worker.

Everything here is pure arithmetic on shard sample counts (from the manifest), so that

* every sample goes to exactly one (rank, worker) per epoch, and every rank gets the same
  number of batches even when the shards do not divide evenly (batches get slightly smaller
  instead: DDP hangs when one rank runs out of batches before the others);
* the shuffled order of a worker's samples is known before any byte is read. The shuffle is a
  local shuffle over sample *positions* within a window (what WebDataset's shuffle buffer does
  to the samples themselves), so it still streams; but a resumed run can compute which
  positions the first k emissions used and skip them without decoding, and skip whole shards
  without opening them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from pipeline.data.streams import DataError


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None  # None when no manifest says how many


@dataclass(frozen=True, eq=False)
class Part:
    """A shard to read: all of it or, in a continued epoch, only its samples not yet consumed."""

    number: int  # the shard's place in the dataset's shard list
    shard: Shard
    indices: np.ndarray | None = None  # ascending sample indices within the shard; None: all

    @property
    def samples(self) -> int:
        return self.shard.samples if self.indices is None else len(self.indices)

    def sample_indices(self) -> np.ndarray:
        return np.arange(self.shard.samples) if self.indices is None else self.indices


@dataclass
class WorkerPlan:
    """One (rank, worker)'s share of an epoch."""

    parts: list[Part]
    samples: int
    batch_sizes: list[int]  # consecutive batches of the emission order
    # Computed only for the workers asked for (O(samples) each):
    order: np.ndarray | None = None  # emission order: positions in the concatenation of ``parts``
    flips: np.ndarray | None = None  # per position: mirror the image horizontally

    @property
    def part_starts(self) -> list[int]:
        return [0, *np.cumsum([p.samples for p in self.parts]).tolist()]


def shard_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's shard order; the same on every rank because the seed is shared."""
    order = list(range(n))
    if shuffle:
        random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    return order


def balance(counts: list[int], order: list[int], bins: int) -> list[list[int]]:
    """Deal items (in ``order``) to ``bins``, each to the bin with the fewest samples so far."""
    totals, dealt = [0] * bins, [[] for _ in range(bins)]
    for item in order:
        target = min(range(bins), key=lambda b: (totals[b], b))
        dealt[target].append(item)
        totals[target] += counts[item]
    return dealt


def window_shuffle(n: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """Positions 0..n-1 shuffled locally: sorted by position plus a uniform jitter of up to
    ``window`` positions. Like a streaming shuffle buffer of that size, it never needs more
    than about ``window`` samples read ahead, but it is computed in one vectorised sort
    (a Python buffer loop cost 2 us per sample, a tenth of decoding a small PNG)."""
    return np.argsort(np.arange(n) + rng.random(n) * window, kind="stable")


def even_batches(n: int, batches: int) -> list[int]:
    """Split n samples into ``batches`` batches whose sizes differ by at most one."""
    return [n // batches + (i < n % batches) for i in range(batches)] if batches else []


class PlanError(DataError):
    """The shards cannot be dealt the way the config asks."""


def epoch_plan(
    shards: list[Shard],
    *,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    shuffle: bool,
    shuffle_buffer: int,
    hflip: bool,
    order_for: Collection[int] = (),
) -> list[WorkerPlan]:
    """The plans of every worker of ``rank`` for ``epoch`` (one entry when num_workers == 0);
    the sample order and flips only for the workers in ``order_for``."""
    if any(s.samples is None for s in shards):
        raise PlanError("epoch mode needs the sample count of every shard: read the shards through their "
                        "manifest.json (the shard writer makes one), or use data.mode=resampled")
    workers = max(1, num_workers)
    counts = [s.samples for s in shards]
    per_rank = balance(counts, shard_order(len(shards), seed, epoch, shuffle), world_size)
    per_worker = [[[Part(i, shards[i]) for i in w] for w in balance(counts, r, workers)] for r in per_rank]
    samples = [[sum(p.samples for p in w) for w in r] for r in per_worker]
    # Every rank must run the same number of batches: the largest need sets it.
    target = max(sum(math.ceil(n / batch_size) for n in r) for r in samples)
    for r, rank_samples in enumerate(samples):
        if sum(rank_samples) < target:
            raise PlanError(
                f"rank {r} gets {sum(rank_samples)} samples but must run {target} batches: "
                f"{len(shards)} shards are too few or too uneven for {world_size} processes x {workers} workers; "
                "write smaller shards or use fewer workers"
            )
    batches = _batches_per_worker(samples[rank], batch_size, target)
    plans = []
    for w, parts in enumerate(per_worker[rank]):
        n = samples[rank][w]
        plan = WorkerPlan(parts, n, even_batches(n, batches[w]))
        if w in order_for:
            rng = np.random.default_rng([seed, epoch, rank, w, 0x5EED])
            plan.order = window_shuffle(n, shuffle_buffer, rng) if shuffle else np.arange(n)
            plan.flips = (rng.random(n) < 0.5) if hflip else np.zeros(n, dtype=bool)
        plans.append(plan)
    return plans


def _batches_per_worker(samples: list[int], batch_size: int, target: int) -> list[int]:
    """Batches per worker: ceil(n / batch_size) each, then extra (smaller) batches to the
    workers with the fullest batches until the rank's total reaches ``target``."""
    batches = [math.ceil(n / batch_size) for n in samples]
    while sum(batches) < target:
        w = max((w for w in range(len(samples)) if batches[w] < samples[w]), key=lambda w: samples[w] / max(batches[w], 1))
        batches[w] += 1
    return batches


def batch_schedule(batches_per_worker: list[int]) -> list[tuple[int, int]]:
    """The order in which a rank takes its workers' batches: (worker, batch index), round-robin
    over the workers that still have batches (what torch's DataLoader does)."""
    schedule, taken = [], [0] * len(batches_per_worker)
    while len(schedule) < sum(batches_per_worker):
        for w, total in enumerate(batches_per_worker):
            if taken[w] < total:
                schedule.append((w, taken[w]))
                taken[w] += 1
    return schedule


def batches_taken(batches_per_worker: list[int], taken: int) -> list[int]:
    """How many batches of each worker the first ``taken`` batches of the schedule hold."""
    if taken > sum(batches_per_worker):
        raise PlanError(f"{taken} batches taken of an epoch that has {sum(batches_per_worker)}")
    counts = [0] * len(batches_per_worker)
    for w, _ in batch_schedule(batches_per_worker)[:taken]:
        counts[w] += 1
    return counts
