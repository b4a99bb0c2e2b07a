"""The one path from shards to batches, read top to bottom:

    shard URLs (+ counts) -> epoch plan: shard order (seed + epoch, same on every rank), shards
    dealt to ranks, then to workers, a shuffled order of each worker's sample positions
    -> read tar members (bytes only of the samples still needed) -> decode -> flip -> batch

Two modes (``data.mode``):

* ``epoch``: every sample once per epoch across all ranks and workers, every rank the same
  number of batches, and an exact, cheap resume from (epoch, batches taken): see plan.py; a
  resume with another number of processes, workers or batch size continues the same epoch
  with exactly the samples not yet seen (``EpochIterator.resume``);
* ``resampled``: an endless stream, each (rank, worker, epoch) drawing shards at random with
  its own seed, for datasets too large to count; an "epoch" is a fixed number of batches, and a
  resume starts a fresh draw at the same point of the epoch (statistically, not exactly, the
  same stream), or at the next epoch under another layout.

Batches are ``{"image": uint8 (N, C, H, W), "key": [str], "worker", "index", "stats"}``; scaling
to floats happens on the training device, not here (4x less to copy between processes).
"""

from __future__ import annotations

import dataclasses
import gc
import io
import logging
import math
import mmap
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyspng
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data.handoff import SlotReader, SlotWriter, shared_uint8
from pipeline.data.plan import (
    Layout,
    PlanError,
    Shard,
    WorkerPlan,
    batch_schedule,
    batches_taken,
    epoch_plan,
    even_batches,
    unconsumed,
)
from pipeline.data.streams import (
    IMAGE_EXTENSIONS,
    DataError,
    ShardStats,
    StreamOptions,
    TarIndex,
    index_tar,
    mappable_path,
    prefetch,
    read_shard,
)
from pipeline.data.urls import resolve_shards
from pipeline.stopping import exit_with_parent, ignore_stop_signals, stop_signals_blocked

log = logging.getLogger(__name__)


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


# resampled mode gives up after this many draws per shard in a row without an image (see samples()).
EMPTY_DRAWS_PER_SHARD = 20

_PNG_COLOUR_TYPE = {"L": 0, "RGB": 2}  # IHDR colour types that are already in the wanted mode


def decode_pixels(payload: bytes, ext: str | None, mode: str) -> np.ndarray:
    """An image member's bytes -> uint8 (H, W, C) in PIL ``mode`` ("L" or "RGB").

    8-bit PNGs already in ``mode`` (what our shard writer makes) go to libspng through pyspng:
    for small images PIL's per-image Python work costs 5-6x the decoding itself. Anything else
    (JPEG, WebP, palette, 16-bit, alpha, a colour conversion) goes through PIL.
    """
    if ext is None:
        raise ValueError("no image member")
    if ext == "png" and payload[12:16] == b"IHDR" and payload[24] == 8 and payload[25] == _PNG_COLOUR_TYPE[mode]:
        pixels = pyspng.load(payload)
    else:
        with Image.open(io.BytesIO(payload)) as image:
            pixels = np.asarray(image if image.mode == mode else image.convert(mode))
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def find_image(members: dict[str, bytes]) -> tuple[str | None, bytes]:
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    return ext, members.get(ext, b"")


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
        max_skip_fraction: float = 0.05,
    ) -> None:
        self.shards = shards
        self.max_skip_fraction = max_skip_fraction  # bounds resampled mode's undecodable draws (EpochIterator sets it)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.rank, self.world_size = rank, world_size
        self.image_mode = {1: "L", 3: "RGB"}[channels]
        self.channels = channels
        self.train, self.mode = train, mode
        self.shuffle_buffer, self.seed, self.hflip = shuffle_buffer, seed, hflip and train
        self.options = options or StreamOptions()
        self.epoch, self.batches_taken = 0, 0
        self.earlier: list[tuple[Layout, tuple[int, ...]]] = []  # see set_position
        self.remaining: np.ndarray | None = None  # what ``earlier`` left of the epoch
        self.released: torch.Tensor | None = None  # set by EpochIterator: batches go through slots
        self._writer: SlotWriter | None = None
        self._parent = os.getpid()  # the process whose DataLoader forks the workers
        if mode == "resampled":
            total = sum(s.samples or 0 for s in shards)
            if epoch_batches == 0 and any(s.samples is None for s in shards):
                raise DataError("resampled mode without a manifest needs data.epoch_batches (batches per epoch per process)")
            self.epoch_batches = epoch_batches or math.ceil(total / (world_size * batch_size))
        elif mode != "epoch":
            raise ValueError(f"unknown data mode {mode!r}")

    # --- the plan, shared by the main process and the workers -------------------------------

    @property
    def layout(self) -> Layout:
        return Layout(self.world_size, max(1, self.num_workers), self.batch_size, self.seed, self.shuffle_buffer)

    def set_position(
        self, epoch: int, batches_taken: int = 0, earlier: Sequence[tuple[Layout, Sequence[int]]] = ()
    ) -> None:
        """Call before ``iter(loader)``: workers get a copy of this object when iteration starts.

        ``earlier``: when the epoch is a continuation, the layouts that consumed part of it
        before this one, each with the batches its ranks took; this layout then reads the rest."""
        earlier = [(layout, tuple(batches)) for layout, batches in earlier]
        if earlier and (epoch, earlier) != (self.epoch, self.earlier):
            # Before the workers start, so that they inherit it instead of each computing it.
            self.remaining = unconsumed(self.shards, epoch=epoch, shuffle=self.train, earlier=earlier)
        self.epoch, self.batches_taken, self.earlier = epoch, batches_taken, earlier

    def plans(self, epoch: int, order_for: tuple[int, ...] = ()) -> list[WorkerPlan]:
        continued = epoch == self.epoch and bool(self.earlier)
        if not self.train and self.world_size * max(1, self.num_workers) > 1:
            # Evaluation: every rank and worker an equal run of the held-out samples, shards cut
            # where needed. Dealing whole shards would leave a rank without data (or failing the
            # equal-batches rule) on a held-out split of one or two shards.
            return epoch_plan(
                self.shards, epoch=epoch, seed=self.seed, rank=self.rank, world_size=self.world_size,
                num_workers=self.num_workers, batch_size=self.batch_size, shuffle=False, shuffle_buffer=1,
                hflip=False, order_for=order_for, remaining=np.ones(sum(s.samples or 0 for s in self.shards), bool),
            )  # fmt: skip
        return epoch_plan(
            self.shards, epoch=epoch, seed=self.seed, rank=self.rank, world_size=self.world_size,
            num_workers=self.num_workers, batch_size=self.batch_size, shuffle=self.train,
            shuffle_buffer=self.shuffle_buffer, hflip=self.hflip, order_for=order_for,
            remaining=self.remaining if continued else None, continuation=len(self.earlier) if continued else 0,
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
        in_worker = get_worker_info() is not None
        if in_worker:
            # The worker was forked from the training process: leave its objects out of our
            # garbage collections, which would otherwise walk (and, by touching them, copy)
            # that whole heap. Costs nothing: the lists are spliced, no object is touched.
            gc.freeze()
            ignore_stop_signals()  # the training process decides when to stop (pipeline/stopping.py)
            exit_with_parent(self._parent)
        self._writer = SlotWriter(self.released, worker) if in_worker and self.released is not None else None
        start = batches_taken(self.batches_per_worker(self.epoch), self.batches_taken)[worker]
        if self.mode == "epoch":
            batches = self._epoch_batches(self.plans(self.epoch, order_for=(worker,))[worker], worker, start)
        else:
            batches = self._resampled_batches(worker, start, self.batches_per_worker(self.epoch)[worker])
        yield from batches if self._writer is None else self._writer.messages(batches)

    def _assemble(self, images: list[np.ndarray], keys: list[str], flips: list[bool], worker: int, index: int,
                  stats: WorkerStats) -> dict[str, Any]:  # fmt: skip
        shapes = {i.shape for i in images}
        if len(shapes) > 1:
            # One odd-sized image must not kill the batch: keep the most common size.
            common = max(shapes, key=lambda s: sum(i.shape == s for i in images))
            odd = [k for i, k in zip(images, keys) if i.shape != common]
            log.warning("skipping %d image(s) of a size other than %s: %s", len(odd), common, odd[:5])
            stats.corrupt += len(odd)
            stats.decoded -= len(odd)
            images, keys, flips = _kept([i.shape == common for i in images], images, keys, flips)
        fields: dict[str, Any]
        if images:
            height, width, channels = images[0].shape
            batch, fields = self._batch_tensor((len(images), channels, height, width))
            pixels = batch.numpy()
            if channels == 1:  # (N, 1, H, W) and (N, H, W, 1) are the same bytes: one C-level copy
                np.concatenate(images, out=pixels.reshape(len(images) * height, width, 1))
            else:
                for j, image in enumerate(images):
                    pixels[j] = image.transpose(2, 0, 1)
            if any(flips):
                pixels[flips] = pixels[flips, :, :, ::-1]
        else:
            fields = {"image": torch.zeros(0, self.channels, 0, 0, dtype=torch.uint8)}
        return {**fields, "key": keys, "worker": worker, "index": index, "stats": dataclasses.asdict(stats)}

    def _batch_tensor(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
        """A uint8 tensor to fill, and the batch fields that stand for it once filled."""
        if self._writer is not None:
            return self._writer.batch(shape)
        # In a worker, in shared memory from the start (as torch's default_collate does):
        # otherwise the batch is copied once more into shared memory when it is sent.
        tensor = shared_uint8(shape) if get_worker_info() is not None else torch.empty(shape, dtype=torch.uint8)
        return tensor, {"image": tensor}

    def _decode(self, sample: Sample, stats: WorkerStats) -> np.ndarray | None:
        """A sample's pixels, or None (counted, named in a warning) if they cannot be decoded."""
        url, key, ext, payload = sample
        try:
            return decode_pixels(payload, ext, self.image_mode)
        except Exception as err:  # any decoder failure: skip, count, name it
            stats.corrupt += 1
            log.warning("skipping sample '%s' of shard %s: %s", key, url, err)
            return None

    def _epoch_batches(self, plan: WorkerPlan, worker: int, start_batch: int):
        stats = WorkerStats()
        offsets = [0, *np.cumsum(plan.batch_sizes).tolist()]
        first = offsets[start_batch]
        stats.not_decoded = first
        needed = plan.order[first:]
        mappable = all(mappable_path(p.shard.url) is not None for p in plan.parts)
        source = (MappedShards if mappable else StreamedShards)(plan, needed, self.options, stats)
        try:
            for index in range(start_batch, len(plan.batch_sizes)):
                positions = plan.order[offsets[index] : offsets[index + 1]]
                images, keys, flips = self._decode_batch(source.take(positions), plan.flips[positions].tolist(), stats)
                yield self._assemble(images, keys, flips, worker, index, stats)
        finally:
            source.close()

    def _decode_batch(self, taken: Taken, flips: list[bool], stats: WorkerStats) -> tuple[list, list, list]:
        """Decoded images, keys and flips of the samples that arrived and could be decoded."""
        if None in taken.payloads:
            present = [p is not None for p in taken.payloads]
            stats.missing += present.count(False)
            *columns, flips = _kept(present, *taken, flips)
            taken = Taken(*columns)
        mode = self.image_mode
        try:
            # One comprehension, no per-sample bookkeeping: at 28x28, each microsecond spent
            # around a decode is ~5% of it.
            images = [decode_pixels(p, e, mode) for p, e in zip(taken.payloads, taken.extensions)]
        except Exception:  # some sample is corrupt: go again one by one, to skip and name it
            images = [self._decode(sample, stats) for sample in zip(*taken)]
            images, keys, flips = _kept([i is not None for i in images], images, taken.keys, flips)
        else:
            keys = taken.keys
        stats.decoded += len(images)
        return images, keys, flips

    def _resampled_batches(self, worker: int, start_batch: int, total_batches: int):
        stats = WorkerStats()
        # The draw depends on where the epoch (re)starts, so a resume draws fresh shards
        # instead of replaying the ones it already trained on.
        rng = random.Random(f"resampled-{self.seed}-{self.epoch}-{self.rank}-{worker}-{start_batch}")
        buffer: list[tuple[str, str, dict[str, bytes]]] = []

        def samples():
            # Draws that gave no image since the last one that did. Without a bound, shards that
            # never give one (a wrong path, a tar of text files) make this loop forever, logging a
            # warning per draw. Give up once every shard has come up empty since the last image,
            # or after EMPTY_DRAWS_PER_SHARD draws per shard (the draw is random: a few shards may
            # not have come up yet, each with odds of e^-20).
            empty: dict[str, str] = {}  # url -> why it gave nothing
            empty_draws, urls = 0, {s.url for s in self.shards}
            while True:
                shard = rng.choice(self.shards)
                shard_stats = ShardStats()
                stats.shards_opened += 1
                for record in read_shard(shard.url, lambda i: True, self.options, shard_stats, shard.samples, IMAGE_EXTENSIONS):
                    yield shard.url, record.key, record.members
                stats.retries += shard_stats.retries
                if shard_stats.failures:
                    stats.missing += 1  # a whole shard draw failed (or ended early)
                if shard_stats.read:
                    empty.clear()
                    empty_draws = 0
                    continue
                empty[shard.url] = shard_stats.failures[-1] if shard_stats.failures else "no sample with an image"
                empty_draws += 1
                if len(empty) == len(urls) or empty_draws >= EMPTY_DRAWS_PER_SHARD * len(urls):
                    named = "; ".join(f"{url} ({why})" for url, why in list(empty.items())[:5])
                    more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
                    raise DataError(
                        f"rank {self.rank}, worker {worker}: {empty_draws} shard draws in a row gave no image, "
                        f"{len(empty)} of the {len(urls)} shards tried: {named}{more}; check that the paths exist "
                        f"and hold images ({', '.join(IMAGE_EXTENSIONS)})"
                    )

        stream = samples()
        planned = total_batches * self.batch_size  # this worker's samples per epoch
        for index in range(start_batch, total_batches):
            images, keys, flips = [], [], []
            while len(images) < self.batch_size:
                while len(buffer) < self.shuffle_buffer:
                    buffer.append(next(stream))
                k = rng.randrange(len(buffer))
                buffer[k], buffer[-1] = buffer[-1], buffer[k]
                url, key, members = buffer.pop()
                flip = self.hflip and rng.random() < 0.5
                pixels = self._decode((url, key, *find_image(members)), stats)
                if pixels is not None:
                    images.append(pixels)
                    keys.append(key)
                    flips.append(flip)
                    stats.decoded += 1
                elif stats.corrupt > self.max_skip_fraction * planned:
                    # A batch is filled by drawing again; over shards whose images are all corrupt
                    # it would never fill, and EpochIterator's own check never see a batch.
                    raise DataError(
                        f"rank {self.rank}, worker {worker}, epoch {self.epoch}: {stats.corrupt} drawn samples could "
                        f"not be decoded, more than data.max_skip_fraction={self.max_skip_fraction} of the {planned} "
                        f"this worker takes per epoch; the last: '{key}' of shard {url}; the warnings above name others"
                    )
            yield self._assemble(images, keys, flips, worker, index, stats)


Sample = tuple[str, str, str | None, bytes]  # (shard url, key, image extension or None, image bytes)


def _kept(keep: list[bool], *columns: list) -> list[list]:
    """Each column (one item per sample) with only the samples ``keep`` marks."""
    return [[x for x, k in zip(column, keep) if k] for column in columns]


class Taken(NamedTuple):
    """Samples, as columns (a payload of None: the sample never arrived)."""

    urls: list[str | None]
    keys: list[str | None]
    extensions: list[str | None]
    payloads: list[bytes | None]


class MappedShards:
    """Random access to a worker's planned samples in local shards: each shard (part) is
    memory-mapped and indexed once (``index_tar``), then any position costs a slice of the map.
    Nothing is buffered: the page cache holds the bytes, and the shuffle order reads them directly.

    Shards must not be truncated in place while a run reads them (the kernel then kills the
    reader with SIGBUS); replacing a file by rename, as ``pipeline-shards`` does, is safe."""

    def __init__(self, plan: WorkerPlan, needed: np.ndarray, options: StreamOptions, stats: WorkerStats) -> None:
        self.parts, self.stats = plan.parts, stats
        self.urls = [p.shard.url for p in self.parts]
        self.starts = plan.part_starts
        self.owner = np.repeat(np.arange(len(self.parts)), [p.samples for p in self.parts])  # part of each position
        # How many positions each part still has to give: a shard is unmapped at zero, and
        # shards nobody needs (after a resume) are never opened.
        self.remaining = np.bincount(self.owner[needed], minlength=len(self.parts))
        stats.shards_skipped += int((self.remaining == 0).sum())
        self.maps: list[Any] = [None] * len(self.parts)  # the open shards' bytes
        self.is_open = np.zeros(len(self.parts), dtype=bool)
        # Per position, filled when its shard is opened: where its image lies (size -1: the
        # shard stopped before it), its key and its image's extension.
        self.offsets = np.zeros(plan.samples, dtype=np.int64)
        self.sizes = np.full(plan.samples, -1, dtype=np.int64)
        self.keys: list[str | None] = [None] * plan.samples
        self.extensions: list[str | None] = [None] * plan.samples

    def take(self, positions: np.ndarray) -> Taken:
        """The samples at ``positions``, in that order; a missing one has payload None."""
        numbers = self.owner[positions]
        shard_of = numbers.tolist()
        for number in set(shard_of):
            if not self.is_open[number]:
                self._open(number)
        maps, order, urls = self.maps, positions.tolist(), self.urls
        taken = Taken(
            [urls[n] for n in shard_of],
            [self.keys[p] for p in order],
            [self.extensions[p] for p in order],
            [maps[n][o : o + s] if s >= 0 else None
             for n, o, s in zip(shard_of, self.offsets[positions].tolist(), self.sizes[positions].tolist())],
        )  # fmt: skip
        self.remaining -= np.bincount(numbers, minlength=len(self.parts))
        for number in np.flatnonzero((self.remaining == 0) & self.is_open).tolist():
            self._close(number)
        return taken

    def _open(self, number: int) -> None:
        part = self.parts[number]
        shard = part.shard
        if number + 1 < len(self.parts):
            prefetch(self.urls[number + 1])
        self.stats.shards_opened += 1
        data: Any = b""
        try:
            with open(mappable_path(shard.url), "rb") as file:
                if os.fstat(file.fileno()).st_size:
                    data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            index = index_tar(data, IMAGE_EXTENSIONS)
        except OSError as err:
            index = TarIndex([], [], [], [], error=str(err))
        index = _with_images(index)
        if len(index.keys) < shard.samples:
            log.warning("shard %s ended after %d of its %d samples%s", shard.url, len(index.keys), shard.samples,
                        f": {index.error}" if index.error else "")  # fmt: skip
        elif len(index.keys) > shard.samples:
            raise more_than_the_manifest(shard, len(index.keys))
        indices = part.sample_indices()
        # The part's first n samples are in the shard (the rest keep size -1: missing).
        n, start = int(np.searchsorted(indices, min(len(index.keys), shard.samples))), self.starts[number]
        chosen = indices[:n]
        self.offsets[start : start + n] = np.asarray(index.offsets)[chosen]
        self.sizes[start : start + n] = np.asarray(index.sizes)[chosen]
        self.keys[start : start + n] = [index.keys[i] for i in chosen.tolist()]
        self.extensions[start : start + n] = [index.extensions[i] for i in chosen.tolist()]
        self.maps[number], self.is_open[number] = data, True

    def _close(self, number: int) -> None:
        data, self.maps[number], self.is_open[number] = self.maps[number], None, False
        if isinstance(data, mmap.mmap):
            try:
                data.close()
            except BufferError:  # a numpy view of it still lives (an exception's traceback): GC closes it
                pass

    def close(self) -> None:
        for number in np.flatnonzero(self.is_open).tolist():
            self._close(number)


def more_than_the_manifest(shard: Shard, found: int | None) -> DataError:
    """A shard that holds more samples than its manifest says: the manifest is older than the
    shard. Reading only the counted ones would drop the rest every epoch, and the epoch plan,
    dealt from the counts, cannot take the others in: the manifest must be rewritten."""
    counted = f"{found} samples with an image, more than the" if found else "more samples with an image than the"
    return DataError(
        f"shard {shard.url} holds {counted} {shard.samples} its manifest says: the "
        "manifest is out of date (the shard was rewritten after it?); rewrite it with `pipeline-shards index "
        "SHARDS --out manifest.json` (or write the shards and manifest again with pipeline-shards)"
    )


def _with_images(index: TarIndex) -> TarIndex:
    """The index without the samples that have no image member: the manifest's counts, and so
    the plan's sample positions, leave them out (the shard indexer reports them)."""
    if None not in index.extensions:
        return index  # every shard the shard writer makes
    keep = [i for i, ext in enumerate(index.extensions) if ext is not None]
    columns = (index.keys, index.extensions, index.offsets, index.sizes)
    return TarIndex(*([column[i] for i in keep] for column in columns), error=index.error)


class StreamedShards:
    """A worker's planned samples from shards that can only be read front to back (HTTP, pipe:,
    gzip): read in order, holding the samples that the shuffle order wants later."""

    def __init__(self, plan: WorkerPlan, needed: np.ndarray, options: StreamOptions, stats: WorkerStats) -> None:
        self.plan, self.options, self.stats = plan, options, stats
        self.records = self._records(set(needed.tolist()))
        self.pending: dict[int, Sample] = {}
        self.lost: list[tuple[int, int]] = []  # position ranges that will never arrive

    def _is_lost(self, position: int) -> bool:
        return any(a <= position < b for a, b in self.lost)

    def take(self, positions: np.ndarray) -> Taken:
        """The samples at ``positions``, in that order; one that never arrived has payload None."""
        samples = [self._get(p) or (None, None, None, None) for p in positions.tolist()]
        return Taken(*map(list, zip(*samples))) if samples else Taken([], [], [], [])

    def _get(self, position: int) -> Sample | None:
        while position not in self.pending and not (self.lost and self._is_lost(position)):
            event = next(self.records, None)
            if event is None:  # the reader ended: everything not read is lost
                self.lost.append((0, self.plan.samples))
            elif event[0] == "lost":
                self.lost.append(event[1])
            else:
                self.pending[event[1]] = event[2]
        return self.pending.pop(position, None)

    def _records(self, needed: set[int]):
        """Events in reading order: ("sample", position, Sample) for needed samples and
        ("lost", (start, end)) for planned positions a shard failed to deliver."""
        plan, stats = self.plan, self.stats
        for number, (part, start) in enumerate(zip(plan.parts, plan.part_starts)):
            shard, end = part.shard, start + part.samples
            indices = part.sample_indices()
            # Sample index in the shard -> position, for the samples this worker still needs.
            wanted = {i: p for i, p in zip(indices.tolist(), range(start, end)) if p in needed}
            if not wanted:
                stats.shards_skipped += 1
                continue
            if number + 1 < len(plan.parts):
                prefetch(plan.parts[number + 1].shard.url)
            shard_stats = ShardStats()
            stats.shards_opened += 1
            seen, last, held = 0, max(wanted), None
            for record in read_shard(shard.url, wanted.__contains__, self.options, shard_stats, shard.samples,
                                     IMAGE_EXTENSIONS):  # fmt: skip
                if record.index >= shard.samples:
                    raise more_than_the_manifest(shard, None)
                seen = record.index + 1
                if record.members is not None:
                    sample = "sample", wanted[record.index], (shard.url, record.key, *find_image(record.members))
                    if record.index != last:
                        yield sample
                    else:  # given once the shard is read to its end, so that samples beyond the count are seen
                        held = sample
            if held is not None:
                yield held
            stats.retries += shard_stats.retries
            if seen < shard.samples:
                if not shard_stats.failures:
                    log.warning("shard %s ended after %d of its %d samples", shard.url, seen, shard.samples)
                yield "lost", (start + int(np.searchsorted(indices, seen)), end)

    def close(self) -> None:
        self.records.close()


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class _Loader(torch.utils.data.DataLoader):
    def __iter__(self):
        # The worker processes start in here: with the stop signals blocked, which they inherit,
        # ignore, then unblock (ShardDataset.__iter__), so that no signal meant for the training
        # process can kill one while it starts.
        with stop_signals_blocked():
            iterator = super().__iter__()
        return _shut_down_when_done(iterator)


def _shut_down_when_done(iterator):
    """The loader's batches; its workers are stopped as soon as the iteration ends, is closed or
    fails. Not left to the iterator's collection: after a worker's error, the traceback keeps the
    iterator alive, and a process exiting with it alive waits forever at exit for its workers
    (multiprocessing's exit terminates them, then joins, and they ignore SIGTERM)."""
    try:
        yield from iterator
    finally:
        if hasattr(iterator, "_shutdown_workers"):  # (none with num_workers=0)
            iterator._shutdown_workers()


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
    loader = _Loader(
        dataset,
        batch_size=None,
        num_workers=dataset.num_workers,
        persistent_workers=False,
        # EpochIterator pins. Torch's pin thread would pin a copy of a worker's slot segment the
        # one time it is sent, and later batches would then be read from that stale copy.
        pin_memory=False,
        # Its own generator: otherwise every iter() draws from the global torch RNG, and a
        # resumed run (which starts a fresh iterator) would draw different latent noise.
        generator=torch.Generator().manual_seed(dataset.seed),
        collate_fn=_as_is,  # batches are made by the dataset; default_convert walks every key
    )
    return loader, dataset


def _layout(state: dict[str, Any]) -> Layout:
    return Layout(**{field.name: state[field.name] for field in dataclasses.fields(Layout)})


class EpochIterator:
    """Endless batches, epoch after epoch, in a fixed order, knowing its position.

    The position is (epoch, batches taken in that epoch), and, when the epoch is the
    continuation of one begun under another layout, those earlier layouts with the batches
    their ranks took. The order within an epoch is the round-robin over workers that
    ``batch_schedule`` defines; batches that arrive out of that order (after a resume, the
    DataLoader starts its round-robin at worker 0) wait here.
    Workers hand batches over through reused slots of shared memory (``handoff.py``).
    It also totals the workers' fault counts and stops the run when too much data is lost.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, dataset: ShardDataset, max_skip_fraction: float = 0.05) -> None:
        self.loader, self.dataset = loader, dataset
        self.max_skip_fraction = dataset.max_skip_fraction = max_skip_fraction
        self.epoch, self.batches_in_epoch = 0, 0
        self.earlier: list[tuple[Layout, tuple[int, ...]]] = []  # layouts that consumed part of this epoch
        self._iterator = None
        self._reader: SlotReader | None = None
        self._totals: dict[str, int] = {}  # fault counts of finished epochs
        self._current: dict[int, dict[str, int]] = {}  # latest counts per worker, this epoch

    def state_dict(self) -> dict[str, Any]:
        """The position and this rank's layout, and the layouts that consumed this epoch before
        it: a few numbers (JSON), from which ``resume`` recomputes what was consumed."""
        return {
            "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "rank": self.dataset.rank,
            **dataclasses.asdict(self.dataset.layout),
            "earlier": [{**dataclasses.asdict(layout), "batches": list(batches)} for layout, batches in self.earlier],
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from this rank's own state, saved under this layout (else use ``resume``)."""
        earlier = [(_layout(s), tuple(s["batches"])) for s in state.get("earlier", [])]
        self._move(state["epoch"], state["batches_in_epoch"], earlier)

    def resume(self, states: list[dict[str, Any]]) -> None:
        """Continue from the ``state_dict()`` of every rank of the run that saved them (``states[i]``:
        rank i's, all from one checkpoint), whatever that run's layout.

        Under the same layout (processes, workers, batch size, seed, shuffle buffer) this is
        ``load_state_dict(states[rank])``: the batches the uninterrupted run would have seen.
        Under another, the same epoch continues with exactly the samples no old rank consumed,
        dealt afresh to this layout's ranks and workers; the epochs after it are ordinary ones.
        In ``resampled`` mode no set of unseen samples exists: another layout starts the next
        epoch, a fresh draw. States saved before they held their layout (only ``epoch`` and
        ``batches_in_epoch``) are taken as this layout's when there are as many as processes;
        otherwise the next epoch starts, with a warning."""
        first, rank = states[0], self.dataset.rank
        epoch = first["epoch"]
        if "world_size" not in first:
            if len(states) == self.dataset.world_size:
                return self.load_state_dict(states[rank])
            return self._restart(epoch + 1, f"the {len(states)} saved positions do not say how they dealt the data")
        old = _layout(first)
        if old == self.dataset.layout:
            return self.load_state_dict(states[rank])
        if self.dataset.mode != "epoch":
            return self._restart(epoch + 1, f"{self.dataset.mode} mode has no exact set of unseen samples")
        if [(s["rank"], s["epoch"], _layout(s), s["earlier"]) for s in states] != [
            (r, epoch, old, first["earlier"]) for r in range(old.world_size)
        ]:
            raise ValueError(f"resume needs the states of all {old.world_size} ranks of one checkpoint, in rank order")
        earlier = [(_layout(s), tuple(s["batches"])) for s in first["earlier"]]
        batches = tuple(s["batches_in_epoch"] for s in states)
        if any(batches):  # (a layout that took nothing changes nothing)
            earlier.append((old, batches))
        try:
            self._move(epoch, 0, earlier)
            self.dataset.batches_per_worker(epoch)  # can what is left be dealt to this layout?
        except PlanError as err:
            return self._restart(epoch + 1, f"what is left of epoch {epoch} cannot be dealt to this layout: {err}")
        if earlier and not self.dataset.remaining.any():
            self._move(epoch + 1, 0, [])  # the old run had finished the epoch: nothing is skipped

    def _restart(self, epoch: int, why: str) -> None:
        log.warning("rank %d: the data restarts at epoch %d, skipping the rest of the epoch before it: %s",
                    self.dataset.rank, epoch, why)  # fmt: skip
        self._move(epoch, 0, [])

    def _move(self, epoch: int, batches_in_epoch: int, earlier: list[tuple[Layout, tuple[int, ...]]]) -> None:
        self.close()
        self.epoch, self.batches_in_epoch, self.earlier = epoch, batches_in_epoch, earlier
        self.dataset.set_position(epoch, batches_in_epoch, earlier)

    def counts(self) -> dict[str, int]:
        """Fault and work counts of this process since it started (all epochs)."""
        out = dict(self._totals)
        for stats in self._current.values():
            for key, value in stats.items():
                out[key] = out.get(key, 0) + value
        return out

    def _start_epoch(self) -> None:
        self.dataset.set_position(self.epoch, self.batches_in_epoch, self.earlier)
        self._schedule = batch_schedule(self.dataset.batches_per_worker(self.epoch))
        if not self._schedule:
            raise DataError(f"epoch {self.epoch} has no batches for rank {self.dataset.rank}")
        self._planned = self.dataset.planned_samples(self.epoch)
        self._reader = SlotReader(self.dataset.num_workers)
        self.dataset.released = self._reader.released  # before iter(): the workers start there
        self._iterator, self._held = iter(self.loader), {}

    def close(self) -> None:
        """Stop the workers now (the next batch starts them again, at the current position)."""
        if getattr(self, "_reader", None) is not None:  # (also from __del__ of a half-made one)
            self._reader.abandon()
        iterator = getattr(self, "_iterator", None)
        if iterator is not None:
            iterator.close()  # stops the workers now (_shut_down_when_done)
        self._iterator, self._reader = None, None

    def __del__(self) -> None:
        self.close()

    def _end_epoch(self) -> None:
        self._totals = self.counts()
        self._current = {}
        self._move(self.epoch + 1, 0, [])

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
                item = next(self._iterator)
            except StopIteration:
                raise DataError(f"the loader ended before batch {wanted} of epoch {self.epoch}") from None
            for batch in self._reader.take(item):
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
