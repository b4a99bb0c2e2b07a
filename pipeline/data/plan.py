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

Because of that, the samples an epoch has consumed are known from its layout (processes,
workers, batch size, seed, shuffle buffer) and the batches each rank took. A run resumed under
another layout continues the same epoch: ``unconsumed`` recomputes what is left, and
``epoch_plan`` deals just that (a *continuation* of the epoch), as parts of shards.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass

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


@dataclass(frozen=True)
class Layout:
    """How the ranks and workers of a run shared out an epoch: with the batches each rank took,
    what the samples they consumed are recomputed from."""

    world_size: int
    num_workers: int  # workers per rank in the plan: 1 when the DataLoader has none
    batch_size: int
    seed: int
    shuffle_buffer: int


def shard_order(n: int, seed: int, epoch: int, shuffle: bool, continuation: int = 0) -> list[int]:
    """The epoch's shard order; the same on every rank because the seed is shared."""
    order = list(range(n))
    if shuffle:
        random.Random(f"shards-{seed}-{epoch}" + (f"-{continuation}" if continuation else "")).shuffle(order)
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


def cut(parts: list[Part], bins: int) -> list[list[Part]]:
    """``parts`` as ``bins`` consecutive runs whose sample counts differ by at most one; a part
    that straddles the end of a run is split there."""
    runs, stack = [], parts[::-1]
    for size in even_batches(sum(p.samples for p in parts), bins):
        run = []
        while size:
            part = stack.pop()
            if part.samples > size:
                indices = part.sample_indices()
                stack.append(Part(part.number, part.shard, indices[size:]))
                part = Part(part.number, part.shard, indices[:size])
            run.append(part)
            size -= part.samples
        runs.append(run)
    return runs


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
    remaining: np.ndarray | None = None,
    continuation: int = 0,
) -> list[WorkerPlan]:
    """The plans of every worker of ``rank`` for ``epoch`` (one entry when num_workers == 0);
    the sample order and flips only for the workers in ``order_for``.

    With ``remaining`` (per sample of the epoch, the shards' samples concatenated in list order:
    not consumed yet, from ``unconsumed``), the plan of the epoch's ``continuation``-th
    continuation under this layout: only those samples, and no shard that has none of them."""
    uncounted = [s.url for s in shards if s.samples is None]
    if uncounted:
        raise PlanError(
            f"epoch mode needs the sample count of every shard, and {len(uncounted)} of {len(shards)} have none "
            f"(e.g. {uncounted[0]}): write a manifest for existing shards with "
            f"`pipeline-shards index 'SHARDS' --out DIR/manifest.json` and read them through it "
            f"(data.train_urls=DIR/manifest.json#train), or use data.mode=resampled"
        )
    workers = max(1, num_workers)
    if remaining is None:
        counts = [s.samples for s in shards]
        per_rank = balance(counts, shard_order(len(shards), seed, epoch, shuffle), world_size)
        per_worker = [[[Part(i, shards[i]) for i in w] for w in balance(counts, r, workers)] for r in per_rank]
    else:
        # What an interrupted epoch leaves is typically a few partly read shards and some whole
        # ones, too few and uneven to deal whole shards: cut into equal runs instead, splitting
        # at most one shard per run.
        parts = _parts_left(shards, remaining)
        parts = [parts[i] for i in shard_order(len(parts), seed, epoch, shuffle, continuation)]
        per_worker = [cut(rank_parts, workers) for rank_parts in cut(parts, world_size)]
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
            # (A continuation's own seed; a fresh epoch's stays what it always was.)
            rng = np.random.default_rng([seed, epoch, rank, w, 0x5EED] + ([continuation] if continuation else []))
            plan.order = window_shuffle(n, shuffle_buffer, rng) if shuffle else np.arange(n)
            plan.flips = (rng.random(n) < 0.5) if hflip else np.zeros(n, dtype=bool)
        plans.append(plan)
    return plans


def _parts_left(shards: list[Shard], remaining: np.ndarray) -> list[Part]:
    if len(remaining) != sum(s.samples for s in shards):
        raise PlanError(f"the consumed samples were computed for {len(remaining)} samples, not these shards' "
                        f"{sum(s.samples for s in shards)}")  # fmt: skip
    parts, start = [], 0
    for number, shard in enumerate(shards):
        indices = np.flatnonzero(remaining[start : start + shard.samples])
        start += shard.samples
        if len(indices):
            parts.append(Part(number, shard, None if len(indices) == shard.samples else indices))
    return parts


def unconsumed(
    shards: list[Shard], *, epoch: int, shuffle: bool, earlier: Sequence[tuple[Layout, Sequence[int]]]
) -> np.ndarray:
    """Per sample of ``epoch`` (the shards' samples concatenated in list order): not consumed by
    the ``earlier`` layouts, in turn, each rank r of one having taken its first ``batches[r]``
    batches of what the layouts before it left. O(samples); nothing is read."""
    starts = np.cumsum([0] + [s.samples or 0 for s in shards])
    remaining = None
    for continuation, (layout, batches) in enumerate(earlier):
        left = np.ones(starts[-1], dtype=bool) if remaining is None else remaining.copy()
        for rank, taken in enumerate(batches):
            plans = epoch_plan(
                shards, epoch=epoch, rank=rank, shuffle=shuffle, hflip=False, order_for=range(layout.num_workers),
                remaining=remaining, continuation=continuation, **asdict(layout),
            )  # fmt: skip
            for plan, n in zip(plans, batches_taken([len(p.batch_sizes) for p in plans], taken)):
                ids = np.concatenate([starts[p.number] + p.sample_indices() for p in plan.parts] + [np.zeros(0, int)])
                left[ids[plan.order[: sum(plan.batch_sizes[:n])]]] = False
        remaining = left
    return remaining


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
