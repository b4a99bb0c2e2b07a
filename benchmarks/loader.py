"""Loader throughput against its two natural baselines, on the same images, in one run.

    python benchmarks/loader.py [--images 60000] [--processes 2] [--batch-size 256]

1. raw decode limit: the same PNG bytes decoded (with the loader's own decode function) in a
   tight loop by the same number of processes, each holding its share already: what a loader
   reading these bytes should not beat (it can by a little: the limit walks one long list of
   bytes objects, the loader one shard at a time, which caches better);
2. our loader: shards -> epoch plan -> tar reading -> shuffle -> decode -> batches, with
   ``--processes`` DataLoader workers, one full epoch;
3. a per-file folder loader: one PNG file per image and a map-style Dataset that opens each
   file (what torchvision's ImageFolder does: PIL), with the same workers and batch size;
4. the same per-file loader decoding with our decoder (libspng), which separates what the
   shard layout gains from what the decoder gains;
5. webdataset's own pipeline on the same shards, written the way its users write it:
   ``WebDataset(urls, shardshuffle=...).shuffle(1000).decode("l8").to_tuple("png")`` batched by
   ``torch.utils.data.DataLoader`` with the same workers (webdataset splits the shards between
   them; its decoder is PIL's). And the same pipeline decoding with our decoder, which separates
   what our pipeline gains from what libspng gains.

The loader decodes 8-bit PNGs with libspng (pyspng), about 6x faster than PIL on 28x28 images.
That raises the decode limit as much, so the loader's own per-sample Python work (index
lookup, batching, passing batches between processes: a few microseconds) weighs more in the
first ratio at small image sizes; ``--resolution 64`` shows a larger image.

Images: Fashion-MNIST's training set from ../shared/data (real 28x28 images), written to
shards by our shard writer and to a folder of PNG files. Each figure is the best of
``--repeats`` runs; the ratios are what to compare across machines.

Rates are timed from an epoch's first batch, as the limit is timed with its processes already
started; how long that first batch took (starting workers, planning, the first shard) is its
own column. The CPU time of all processes per image, the whole epoch included, is steadier
than rates on a machine shared with others, and its ratio to the limit's is the loader's
overhead without the noise.

Two page-cache states, when this process may drop the kernel's page cache (root):
``warm`` (every file already in memory: the best case for one-file-per-image) and ``cold``
(the cache dropped before each loader run: what a dataset larger than RAM meets).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.loader import EpochIterator, decode_pixels, make_loader
from pipeline.data.shards import encode_png, prepare_image, write_dataset
from pipeline.data.sources import read_idx

DATA = next(
    (p / "train-images-idx3-ubyte.gz" for p in (Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist",
                                                 Path("/usr/share/datasets/fashion-mnist")) if p.exists()),
    Path("../shared/data/fashion-mnist/train-images-idx3-ubyte.gz"),
)  # ../shared beside the checkout, else Debian's dataset-fashion-mnist package


@dataclass
class Run:
    rate: float  # images/s once the first batch is out (workers started, as the limit's are)
    first_batch: float | None  # s from asking for the epoch to its first batch
    cpu: float  # CPU time of all processes per image, in us: steadier than rates on a shared machine


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_epoch(batches: Iterator[torch.Tensor], stop_workers: Callable[[], None]) -> Run:
    cpu, start = _cpu_seconds(), time.perf_counter()
    first = next(batches).shape[0]
    warm = time.perf_counter()
    rest = sum(batch.shape[0] for batch in batches)
    end = time.perf_counter()
    stop_workers()  # their CPU time is counted once they have ended
    return Run(rest / (end - warm), warm - start, (_cpu_seconds() - cpu) / (first + rest) * 1e6)


_PAYLOADS: list[bytes] = []  # set before the pool forks, so the workers inherit the bytes


def _decode_share(share: tuple[int, int, int]) -> int:
    worker, processes, limit = share
    chunk = _PAYLOADS[worker::processes][:limit]
    for payload in chunk:
        decode_pixels(payload, "png", "L")
    return len(chunk)


def raw_decode(payloads: list[bytes], processes: int) -> Run:
    """Each process decodes its share of bytes it already holds (inherited through fork, not
    sent: sending them would be timed too, and flatter the loader)."""
    global _PAYLOADS
    _PAYLOADS = payloads
    cpu = _cpu_seconds()
    pool = mp.get_context("fork").Pool(processes)
    pool.map(_decode_share, [(i, processes, 50) for i in range(processes)])  # start and warm the processes
    start = time.perf_counter()
    done = sum(pool.map(_decode_share, [(i, processes, len(payloads)) for i in range(processes)]))
    rate = done / (time.perf_counter() - start)
    pool.close()
    pool.join()
    return Run(rate, None, (_cpu_seconds() - cpu) / (done + 50 * processes) * 1e6)


def our_loader(shard_dir: Path, processes: int, batch_size: int) -> Run:
    loader, dataset = make_loader(f"{shard_dir}/manifest.json#train", batch_size=batch_size, num_workers=processes,
                                  channels=1, shuffle_buffer=1000)  # fmt: skip
    iterator = EpochIterator(loader, dataset)
    batches = sum(dataset.batches_per_worker(0))
    return timed_epoch((next(iterator)["image"] for _ in range(batches)), iterator.close)


class PerFileDataset(torch.utils.data.Dataset):
    """The usual folder dataset: one file open and decode per item, with PIL (what
    torchvision's ImageFolder does) or with our decoder (to compare the layouts alone)."""

    def __init__(self, paths: list[Path], our_decoder: bool = False) -> None:
        self.paths, self.our_decoder = paths, our_decoder

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.our_decoder:
            return torch.from_numpy(decode_pixels(self.paths[index].read_bytes(), "png", "L")).permute(2, 0, 1)
        with Image.open(self.paths[index]) as image:
            return torch.from_numpy(np.array(image.convert("L"))).unsqueeze(0)


def per_file(paths: list[Path], processes: int, batch_size: int, our_decoder: bool = False) -> Run:
    dataset = PerFileDataset(paths, our_decoder)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=processes)
    return timed_epoch(iter(loader), lambda: None)  # torch stops its workers at the end of the epoch


def _our_png_decoder(key: str, data: bytes):
    return decode_pixels(data, "png", "L")[..., 0] if key.endswith(".png") else None


def webdataset_pipeline(shard_dir: Path, processes: int, batch_size: int, our_decoder: bool = False) -> Run:
    """The loader users would pick instead of ours: webdataset's documented recipe, samples
    shuffled in a buffer, decoded to uint8 arrays, collated by torch's DataLoader."""
    import webdataset as wds

    urls = [str(path) for path in sorted(shard_dir.glob("*.tar"))]
    decoder = _our_png_decoder if our_decoder else "l8"
    dataset = wds.WebDataset(urls, shardshuffle=len(urls)).shuffle(1000).decode(decoder).to_tuple("png")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=processes)
    return timed_epoch((images for (images,) in loader), lambda: None)


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def can_drop_caches() -> bool:
    try:
        drop_caches()
        return True
    except OSError:
        return False


def drop_caches() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=60000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=0, help="resize the 28x28 images to this size first (0: keep)")
    parser.add_argument("--workdir", default="/var/tmp", help="where the shards and files go (a real disk)")
    parser.add_argument("--data", type=Path, default=DATA, help="Fashion-MNIST's train-images-idx3-ubyte.gz")
    args = parser.parse_args()
    torch.set_num_threads(1)

    samples = []
    for i, sample in enumerate(read_idx(args.data)):
        if i == args.images:
            break
        key, image, meta = sample
        samples.append((key, prepare_image(image, args.resolution or None), meta))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        shard_dir, folder = Path(tmp) / "shards", Path(tmp) / "folder"
        write_dataset(shard_dir, {"train": iter(samples)}, 1000, {"name": "fashion-mnist-bench"})
        folder.mkdir()
        payloads, paths = [], []
        for key, image, _ in samples:
            payload = encode_png(image)
            payloads.append(payload)
            paths.append(folder / f"{key}.png")
            paths[-1].write_bytes(payload)
        size = Image.open(io.BytesIO(payloads[0])).size[0]

        states = ["warm", "cold"] if can_drop_caches() else ["warm"]
        best: dict[str, Run] = {}

        def record(name: str, run: Run) -> None:
            """The best of each figure over the repeats (each figure on its own)."""
            old = best.get(name, run)
            firsts = [f for f in (old.first_batch, run.first_batch) if f is not None]
            best[name] = Run(max(old.rate, run.rate), min(firsts, default=None), min(old.cpu, run.cpu))

        for _ in range(args.repeats):
            record("raw decode limit", raw_decode(payloads, args.processes))
            for state in states:
                # Interleaved, so that a slow spell of this shared machine hits both loaders.
                if state == "cold":
                    drop_caches()
                record(f"our loader, {state} cache", our_loader(shard_dir, args.processes, args.batch_size))
                if state == "cold":
                    drop_caches()
                record(f"per-file loader, {state} cache", per_file(paths, args.processes, args.batch_size))
                if state == "cold":
                    drop_caches()
                record(f"per-file, our decoder, {state}", per_file(paths, args.processes, args.batch_size, True))
                if state == "cold":
                    drop_caches()
                record(f"webdataset pipeline, {state}", webdataset_pipeline(shard_dir, args.processes, args.batch_size))
                if state == "cold":
                    drop_caches()
                record(f"webdataset, our decoder, {state}",
                       webdataset_pipeline(shard_dir, args.processes, args.batch_size, True))

    print(f"{len(samples)} Fashion-MNIST images ({size}x{size} PNG), {args.processes} processes, batch {args.batch_size}, "
          f"best of {args.repeats}")  # fmt: skip
    print(f"  {'':30s} {'images/s':>10s} {'first batch':>12s} {'CPU us/image':>13s}")
    for name, run in best.items():
        first = "" if run.first_batch is None else f"{run.first_batch * 1e3:,.0f} ms"
        print(f"  {name:30s} {run.rate:10,.0f} {first:>12s} {run.cpu:13.1f}")
    limit = best["raw decode limit"]
    for state in states:
        ours = best[f"our loader, {state} cache"]
        print(f"  {state} cache: our loader / raw decode limit = {ours.rate / limit.rate:.2f}x (goal >= 0.90x; in CPU per "
              f"image {limit.cpu / ours.cpu:.2f}x), our loader / per-file loader = "
              f"{ours.rate / best[f'per-file loader, {state} cache'].rate:.2f}x (goal >= 1.50x), "
              f"/ per-file with our decoder = {ours.rate / best[f'per-file, our decoder, {state}'].rate:.2f}x, "
              f"/ webdataset's pipeline = {ours.rate / best[f'webdataset pipeline, {state}'].rate:.2f}x "
              f"(in CPU per image {best[f'webdataset pipeline, {state}'].cpu / ours.cpu:.2f}x), "
              f"/ webdataset with our decoder = {ours.rate / best[f'webdataset, our decoder, {state}'].rate:.2f}x")

if __name__ == "__main__":
    main()
