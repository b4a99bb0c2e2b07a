"""The one path from shards to batches, read top to bottom:

    shard URLs -> shuffle shard order (seed + epoch, same on every rank) -> split by rank
    -> split by worker -> tar members -> samples -> shuffle buffer -> decode -> batch

Batches are ``{"image": uint8 (N, C, H, W), "key": [str]}``; scaling to floats happens on the
training device, not in the workers (4x less to copy). The rank and world size are passed in
explicitly rather than read from ``torch.distributed`` inside the workers, so the same
pipeline is testable without a process group.
"""

from __future__ import annotations

import io
import logging
import random
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _warn_and_continue(exn: Exception) -> bool:
    log.warning("skipping unreadable data: %r", exn)
    return True


class ShardStream(IterableDataset):
    """An epoch of samples from this rank's and this worker's share of the shards."""

    def __init__(
        self,
        urls: str | list[str],
        *,
        rank: int = 0,
        world_size: int = 1,
        channels: int = 3,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ) -> None:
        self.urls = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError(f"no shard URLs in {urls!r}")
        self.rank, self.world_size = rank, world_size
        self.mode = {1: "L", 3: "RGB"}[channels]
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before ``iter()``: workers get a copy of this object when the iteration starts."""
        self.epoch = epoch

    def shard_order(self) -> list[str]:
        """This rank's and worker's shards for the current epoch."""
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(urls)
        worker, num_workers = _worker()
        return urls[self.rank :: self.world_size][worker::num_workers]

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raise ValueError(f"sample {sample['__key__']} in {sample.get('__url__')} has no image member")
        with Image.open(io.BytesIO(sample[ext])) as image:
            pixels = np.asarray(image.convert(self.mode))
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        return {"image": torch.from_numpy(pixels.copy()).permute(2, 0, 1), "key": sample["__key__"]}

    def __iter__(self):
        samples = wds.tarfile_to_samples(handler=_warn_and_continue)(iter({"url": u} for u in self.shard_order()))
        if self.shuffle:
            worker, _ = _worker()
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
            samples = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(samples)
        for sample in samples:
            try:
                yield self.decode(sample)
            except Exception as exn:  # a corrupt image must not end the epoch
                _warn_and_continue(exn)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"image": torch.stack([s["image"] for s in samples]), "key": [s["key"] for s in samples]}


class BatchStream(IterableDataset):
    """Groups a ShardStream into batches inside each worker (one IPC message per batch)."""

    def __init__(self, stream: ShardStream, batch_size: int, drop_last: bool) -> None:
        self.stream, self.batch_size, self.drop_last = stream, batch_size, drop_last

    def __iter__(self):
        batch = []
        for sample in self.stream:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch and not self.drop_last:
            yield collate(batch)


def make_loader(
    urls: str | list[str],
    *,
    batch_size: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    channels: int = 3,
    train: bool = True,
    shuffle_buffer: int = 1000,
    seed: int = 0,
) -> tuple[torch.utils.data.DataLoader, ShardStream]:
    """Returns the loader and its ShardStream (to ``set_epoch`` before each pass).

    ``train=True`` shuffles and drops the last partial batch; ``train=False`` reads in order and
    keeps it (evaluation must see every held-out image).
    """
    stream = ShardStream(
        urls, rank=rank, world_size=world_size, channels=channels, shuffle=train, shuffle_buffer=shuffle_buffer, seed=seed
    )
    loader = torch.utils.data.DataLoader(
        BatchStream(stream, batch_size, drop_last=train),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        # Its own generator: otherwise every iter() draws from the global torch RNG, and a
        # resumed run (which starts a fresh iterator) would draw different latent noise.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, stream


class EpochIterator:
    """Endless batches, epoch after epoch, that knows its position for checkpoints.

    The position is (epoch, batches taken in that epoch). Restoring it replays the epoch's
    deterministic order and drops the batches already taken, so a resumed run sees the batches
    an uninterrupted run would have seen.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, stream: ShardStream) -> None:
        self.loader, self.stream = loader, stream
        self.epoch, self.batches_in_epoch = 0, 0
        self._iterator = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        self._iterator = None

    def _start_epoch(self) -> None:
        self.stream.set_epoch(self.epoch)
        self._iterator = iter(self.loader)
        for _ in range(self.batches_in_epoch):
            next(self._iterator)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._start_epoch()
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.batches_in_epoch == 0:
                raise RuntimeError(f"an epoch of {len(self.stream.urls)} shard(s) gave no full batch") from None
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
            self._start_epoch()
            batch = next(self._iterator)
        self.batches_in_epoch += 1
        return batch
