"""The one path from shards to batches, read top to bottom:

    shard URLs (+ counts) -> epoch plan: shard order (seed + epoch, same on every rank), shards
    dealt to ranks, then to workers, a shuffled order of each worker's sample positions
    -> read tar members (bytes only of the samples still needed) -> decode -> flip -> batch

Two modes (``data.mode``):

* ``epoch``: every sample once per epoch across all ranks and workers, every rank the same
  number of batches, and an exact, cheap resume from (epoch, batches taken): see plan.py;
* ``resampled``: an endless stream, each (rank, worker, epoch) drawing shards at random with
  its own seed, for datasets too large to count; an "epoch" is a fixed number of batches, and a
  resume starts a fresh draw at the same point of the epoch (statistically, not exactly, the
  same stream).

Batches are ``{"image": uint8 (N, C, H, W), "key": [str], "worker", "index", "stats"}``; scaling
to floats happens on the training device, not here (4x less to copy between processes).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data.plan import Shard, WorkerPlan, batch_schedule, epoch_plan, even_batches
from pipeline.data.streams import DataError, ShardStats, StreamOptions, prefetch, read_shard
from pipeline.data.urls import resolve_shards

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


@dataclass
class WorkerStats:
    """What one worker did in the current epoch (cumulative; sent along with every batch)."""

    decoded: int = 0
    corrupt: int = 0  # samples whose image could not be decoded (or had the wrong size)
    missing: int = 0  # planned samples never read: missing shard, truncated tar, dead connection
    retries: int = 0
    shards_opened: int = 0
    shards_skipped: int = 0  # not opened at all: every sample in them was consumed before a resume
    not_decoded: int = 0  # samples passed over without decoding (resume)


def decode_image(members: dict[str, bytes], mode: str, flip: bool = False) -> torch.Tensor:
    """A sample's image member -> uint8 (C, H, W) in PIL ``mode`` ("L" or "RGB")."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        raise ValueError(f"no image member (has: {', '.join(members) or 'nothing'})")
    with Image.open(io.BytesIO(members[ext])) as image:
        pixels = np.array(image if image.mode == mode else image.convert(mode))  # writable, as torch wants
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if flip:
        pixels = np.ascontiguousarray(pixels[:, ::-1])
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ShardDataset(IterableDataset):
    """Yields this rank's batches for one epoch, from whichever DataLoader worker runs it."""

    def __init__(
        self,
        shards: list[Shard],
        *,
        batch_size: int,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels: int = 3,
        train: bool = True,
        mode: str = "epoch",
        shuffle_buffer: int = 1000,
        seed: int = 0,
        hflip: bool = False,
        epoch_batches: int = 0,
        options: StreamOptions | None = None,
    ) -> None:
        self.shards = shards
        self.batch_size, self.num_workers = batch_size, num_workers
        self.rank, self.world_size = rank, world_size
        self.image_mode = {1: "L", 3: "RGB"}[channels]
        self.channels = channels
        self.train, self.mode = train, mode
        self.shuffle_buffer, self.seed, self.hflip = shuffle_buffer, seed, hflip and train
        self.options = options or StreamOptions()
        self.epoch, self.batches_taken = 0, 0
        if mode == "resampled":
            total = sum(s.samples or 0 for s in shards)
            if epoch_batches == 0 and any(s.samples is None for s in shards):
                raise DataError("resampled mode without a manifest needs data.epoch_batches (batches per epoch per process)")
            self.epoch_batches = epoch_batches or math.ceil(total / (world_size * batch_size))
        elif mode != "epoch":
            raise ValueError(f"unknown data mode {mode!r}")

    # --- the plan, shared by the main process and the workers -------------------------------

    def set_position(self, epoch: int, batches_taken: int = 0) -> None:
        """Call before ``iter(loader)``: workers get a copy of this object when iteration starts."""
        self.epoch, self.batches_taken = epoch, batches_taken

    def plans(self, epoch: int, order_for: int | None = None) -> list[WorkerPlan]:
        return epoch_plan(
            self.shards, epoch=epoch, seed=self.seed, rank=self.rank, world_size=self.world_size,
            num_workers=self.num_workers, batch_size=self.batch_size, shuffle=self.train,
            shuffle_buffer=self.shuffle_buffer, hflip=self.hflip, order_for=order_for,
        )  # fmt: skip

    def batches_per_worker(self, epoch: int) -> list[int]:
        if self.mode == "epoch":
            return [len(p.batch_sizes) for p in self.plans(epoch)]
        return even_batches(self.epoch_batches, max(1, self.num_workers))

    def planned_samples(self, epoch: int) -> int:
        if self.mode == "epoch":
            return sum(p.samples for p in self.plans(epoch))
        return self.epoch_batches * self.batch_size

    # --- inside a worker ---------------------------------------------------------------------

    def __iter__(self):
        worker, num_workers = _worker()
        if num_workers != max(1, self.num_workers):
            raise RuntimeError(f"dataset planned for {self.num_workers} workers runs in {num_workers}")
        schedule = batch_schedule(self.batches_per_worker(self.epoch))
        start = sum(1 for w, _ in schedule[: self.batches_taken] if w == worker)
        if self.mode == "epoch":
            yield from self._epoch_batches(self.plans(self.epoch, order_for=worker)[worker], worker, start)
        else:
            yield from self._resampled_batches(worker, start, self.batches_per_worker(self.epoch)[worker])

    def _decode(self, members: dict[str, bytes], flip: bool) -> torch.Tensor:
        return decode_image(members, self.image_mode, flip)

    def _batch(self, images: list[torch.Tensor], keys: list[str], worker: int, index: int, stats: WorkerStats) -> dict[str, Any]:
        if images and any(i.shape != images[0].shape for i in images):
            shapes = {tuple(i.shape) for i in images}
            # One odd-sized image must not kill the batch: keep the most common size.
            common = max(shapes, key=lambda s: sum(tuple(i.shape) == s for i in images))
            odd = [k for i, k in zip(images, keys) if tuple(i.shape) != common]
            log.warning("skipping %d image(s) of a size other than %s: %s", len(odd), common, odd[:5])
            stats.corrupt += len(odd)
            keys = [k for i, k in zip(images, keys) if tuple(i.shape) == common]
            images = [i for i in images if tuple(i.shape) == common]
        image = torch.stack(images) if images else torch.zeros(0, self.channels, 0, 0, dtype=torch.uint8)
        return {"image": image, "key": keys, "worker": worker, "index": index, "stats": dataclasses.asdict(stats)}

    def _epoch_batches(self, plan: WorkerPlan, worker: int, start_batch: int):
        stats = WorkerStats()
        offsets = [0, *np.cumsum(plan.batch_sizes).tolist()]
        first = offsets[start_batch]
        needed = set(plan.order[first:].tolist())
        stats.not_decoded = first
        records = self._records(plan, needed, stats)
        pending: dict[int, tuple[str, str, dict[str, bytes]]] = {}
        lost: list[tuple[int, int]] = []  # position ranges that will never arrive

        def is_lost(position: int) -> bool:
            return any(a <= position < b for a, b in lost)

        flips = plan.flips.tolist()
        for index in range(start_batch, len(plan.batch_sizes)):
            images, keys = [], []
            for position in plan.order[offsets[index] : offsets[index + 1]].tolist():
                while position not in pending and not (lost and is_lost(position)):
                    event = next(records, None)
                    if event is None:  # the reader ended: everything not read is lost
                        lost.append((0, len(plan.order)))
                    elif event[0] == "lost":
                        lost.append(event[1])
                    else:
                        pending[event[1]] = event[2]
                if position not in pending:
                    stats.missing += 1
                    continue
                url, key, members = pending.pop(position)
                try:
                    images.append(self._decode(members, flips[position]))
                    keys.append(key)
                    stats.decoded += 1
                except Exception as err:  # any decoder failure: skip, count, name it
                    stats.corrupt += 1
                    log.warning("skipping sample '%s' of shard %s: %s", key, url, err)
            yield self._batch(images, keys, worker, index, stats)

    def _records(self, plan: WorkerPlan, needed: set[int], stats: WorkerStats):
        """Events in reading order: ("sample", position, (url, key, members)) for needed
        samples and ("lost", (start, end)) for planned positions a shard failed to deliver."""
        for number, (shard, start) in enumerate(zip(plan.shards, plan.shard_starts)):
            end = start + shard.samples
            if not any(p in needed for p in range(start, end)):
                stats.shards_skipped += 1
                continue
            if number + 1 < len(plan.shards):
                prefetch(plan.shards[number + 1].url)
            shard_stats = ShardStats()
            stats.shards_opened += 1
            seen = 0
            wanted = lambda i, s=start: s + i in needed  # noqa: E731
            for record in read_shard(shard.url, wanted, self.options, shard_stats, shard.samples, IMAGE_EXTENSIONS):
                if record.index >= shard.samples:
                    log.warning("shard %s has more samples than its manifest says (%d); ignoring '%s'",
                                shard.url, shard.samples, record.key)
                    continue
                seen = record.index + 1
                if record.members is not None:
                    yield "sample", start + record.index, (shard.url, record.key, record.members)
            stats.retries += shard_stats.retries
            if seen < shard.samples:
                if not shard_stats.failures:
                    log.warning("shard %s ended after %d of its %d samples", shard.url, seen, shard.samples)
                yield "lost", (start + seen, end)

    def _resampled_batches(self, worker: int, start_batch: int, total_batches: int):
        stats = WorkerStats()
        # The draw depends on where the epoch (re)starts, so a resume draws fresh shards
        # instead of replaying the ones it already trained on.
        rng = random.Random(f"resampled-{self.seed}-{self.epoch}-{self.rank}-{worker}-{start_batch}")
        buffer: list[tuple[str, str, dict[str, bytes]]] = []

        def samples():
            while True:
                shard = rng.choice(self.shards)
                shard_stats = ShardStats()
                stats.shards_opened += 1
                for record in read_shard(shard.url, lambda i: True, self.options, shard_stats, shard.samples, IMAGE_EXTENSIONS):
                    yield shard.url, record.key, record.members
                stats.retries += shard_stats.retries
                if shard_stats.failures:
                    stats.missing += 1  # a whole shard draw failed (or ended early)
                if shard_stats.read == 0 and shard_stats.failures and all(s.url == shard.url for s in self.shards):
                    raise DataError(f"the only shard, {shard.url}, cannot be read")

        stream = samples()
        for index in range(start_batch, total_batches):
            images, keys = [], []
            while len(images) < self.batch_size:
                while len(buffer) < self.shuffle_buffer:
                    buffer.append(next(stream))
                k = rng.randrange(len(buffer))
                buffer[k], buffer[-1] = buffer[-1], buffer[k]
                url, key, members = buffer.pop()
                try:
                    images.append(self._decode(members, self.hflip and rng.random() < 0.5))
                    keys.append(key)
                    stats.decoded += 1
                except Exception as err:
                    stats.corrupt += 1
                    log.warning("skipping sample '%s' of shard %s: %s", key, url, err)
            yield self._batch(images, keys, worker, index, stats)


def make_loader(
    urls: str | list[str] | list[Shard],
    *,
    batch_size: int,
    train: bool = True,
    options: StreamOptions | None = None,
    **settings: Any,
) -> tuple[torch.utils.data.DataLoader, ShardDataset]:
    """The DataLoader and its dataset (for ``set_position`` and the plan). ``settings`` are
    ShardDataset's (num_workers, rank, world_size, channels, mode, shuffle_buffer, seed, ...).

    ``train=True`` shuffles (and flips, if asked); ``train=False`` reads in shard order, for
    evaluation. Both see every sample exactly once per epoch in ``epoch`` mode.
    """
    options = options or StreamOptions()
    if isinstance(urls, list) and urls and isinstance(urls[0], Shard):
        shards = urls
    else:
        shards = resolve_shards(urls, options, default_split="train" if train else "heldout")
    dataset = ShardDataset(shards, batch_size=batch_size, train=train, options=options, **settings)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=dataset.num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        # Its own generator: otherwise every iter() draws from the global torch RNG, and a
        # resumed run (which starts a fresh iterator) would draw different latent noise.
        generator=torch.Generator().manual_seed(dataset.seed),
    )
    return loader, dataset


class EpochIterator:
    """Endless batches, epoch after epoch, in a fixed order, knowing its position.

    The position is (epoch, batches taken in that epoch). The order within an epoch is the
    round-robin over workers that ``batch_schedule`` defines; batches that arrive out of that
    order (after a resume, the DataLoader starts its round-robin at worker 0) wait here.
    It also totals the workers' fault counts and stops the run when too much data is lost.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, dataset: ShardDataset, max_skip_fraction: float = 0.05) -> None:
        self.loader, self.dataset = loader, dataset
        self.max_skip_fraction = max_skip_fraction
        self.epoch, self.batches_in_epoch = 0, 0
        self._iterator = None
        self._totals: dict[str, int] = {}  # fault counts of finished epochs
        self._current: dict[int, dict[str, int]] = {}  # latest counts per worker, this epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        self._iterator = None

    def counts(self) -> dict[str, int]:
        """Fault and work counts of this process since it started (all epochs)."""
        out = dict(self._totals)
        for stats in self._current.values():
            for key, value in stats.items():
                out[key] = out.get(key, 0) + value
        return out

    def _start_epoch(self) -> None:
        self.dataset.set_position(self.epoch, self.batches_in_epoch)
        self._schedule = batch_schedule(self.dataset.batches_per_worker(self.epoch))
        if not self._schedule:
            raise DataError(f"epoch {self.epoch} has no batches for rank {self.dataset.rank}")
        self._planned = self.dataset.planned_samples(self.epoch)
        self._iterator, self._held = iter(self.loader), {}

    def _end_epoch(self) -> None:
        self._totals = self.counts()
        self._current = {}
        self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._start_epoch()
        if self.batches_in_epoch >= len(self._schedule):
            self._end_epoch()
            self._start_epoch()
        wanted = self._schedule[self.batches_in_epoch]
        while wanted not in self._held:
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise DataError(f"the loader ended before batch {wanted} of epoch {self.epoch}") from None
            self._held[(batch["worker"], batch["index"])] = batch
        batch = self._held.pop(wanted)
        self._current[batch["worker"]] = batch["stats"]
        self.batches_in_epoch += 1
        self._check_losses()
        return batch

    def _check_losses(self) -> None:
        lost = sum(s["corrupt"] + s["missing"] for s in self._current.values())
        if lost > self.max_skip_fraction * self._planned:
            raise DataError(
                f"epoch {self.epoch}, rank {self.dataset.rank}: {lost} of {self._planned} planned samples could not be "
                f"read ({sum(s['corrupt'] for s in self._current.values())} corrupt, "
                f"{sum(s['missing'] for s in self._current.values())} missing), more than "
                f"data.max_skip_fraction={self.max_skip_fraction}; the warnings above name the shards and keys"
            )
