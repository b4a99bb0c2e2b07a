"""The shard writer: images -> WebDataset tar shards + ``manifest.json``, and its CLI.

Each sample is two tar members sharing a key: ``<key>.<format>`` (the image: ``png``, lossless,
by default; ``jpg`` or ``webp`` on request) and ``<key>.json`` (its metadata). Shards are written
by hand with ``tarfile`` rather than with ``webdataset.TarWriter`` because we want
byte-identical output for identical input (fixed mtime, owner and mode; images encoded without
timestamps), so a shard's sha256 in the manifest identifies its content, and each shard appears
under its final name only once it is complete (written to a temporary name, then renamed).
The manifest is written last, the same way, so its presence means the dataset is complete.

The command line (``pipeline-shards`` or ``python -m pipeline.data.shards``) reads an image
folder, idx (MNIST) files, CIFAR batches or a list of paths (see ``sources.py``), optionally
resizes and converts the images, splits them into ``train`` and ``heldout``, and writes::

    pipeline-shards SOURCE OUT_DIR --samples-per-shard 1000 --resolution 32 --heldout-fraction 0.1

``pipeline-shards index SHARDS --out manifest.json`` writes only the manifest, for shards that
exist already (``indexer.py``); ``pipeline-shards verify MANIFEST`` checks the shards against it
(``verify.py``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from pipeline.data.sources import KINDS, Sample, Skipped, SourceError, open_source

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}  # --format -> Pillow's name
IMAGE_FORMATS = tuple(PIL_FORMATS)
DEFAULT_QUALITY = 95  # jpg / webp; high, because these images are training targets
SPLITS = ("train", "heldout")

# --- encoding -------------------------------------------------------------------------------


def encode_png(image: np.ndarray) -> bytes:
    """HWC or HW uint8 array -> PNG bytes (deterministic: no timestamp chunk)."""
    return encode_image(image, "png")


def encode_image(image: np.ndarray, image_format: str = "png", quality: int | None = None) -> bytes:
    """``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` uint8 -> PNG, JPEG or WebP bytes.

    Deterministic: Pillow writes no timestamps into any of the three, and the encoders have no
    randomness. WebP has no grayscale mode, so Pillow stores a grayscale image as RGB with
    three equal channels (the loader converts it back losslessly).
    """
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}; expected one of {', '.join(IMAGE_FORMATS)}")
    mode = "L" if image.ndim == 2 or image.shape[-1] == 1 else "RGB"
    picture = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and mode == "L" else image, mode)
    settings = {"compress_level": 6} if image_format == "png" else {"quality": quality or DEFAULT_QUALITY}
    buffer = io.BytesIO()
    picture.save(buffer, format=PIL_FORMATS[image_format], **settings)
    return buffer.getvalue()


def resize_and_center_crop(picture: Image.Image, size: int) -> Image.Image:
    """Scale so the short side is ``size`` (Lanczos), then cut the central ``size x size``."""
    width, height = picture.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size != picture.size:
        picture = picture.resize(new_size, Image.LANCZOS)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return picture.crop((left, top, left + size, top + size))


def prepare_image(image: np.ndarray, resolution: int | None = None, channels: int | None = None) -> np.ndarray:
    """``(H, W[, C])`` uint8 -> ``(R, R)`` or ``(R, R, 3)`` uint8 (or the original size when
    ``resolution`` is None). ``channels`` 1 or 3 converts; None keeps grayscale grayscale and
    makes anything else RGB."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    current = "L" if image.ndim == 2 else "RGB" if image.shape[-1] == 3 else None
    target = {1: "L", 3: "RGB"}.get(channels) or ("L" if current == "L" else "RGB")
    if current == target and not resolution:
        return image  # nothing to change: spare the two copies through PIL
    picture = Image.fromarray(image)
    if picture.mode != target:
        picture = picture.convert(target)
    if resolution:
        picture = resize_and_center_crop(picture, resolution)
    return np.asarray(picture)


@dataclass(frozen=True)
class EncodeOptions:
    """How each source image becomes a tar member (see ``prepare_image`` / ``encode_image``)."""

    resolution: int | None = None
    channels: int | None = None
    image_format: str = "png"
    quality: int | None = None


class ImageSums(NamedTuple):
    """One image's per-channel pixel sums, the unit ``PixelStatistics`` adds up."""

    sums: tuple[int, ...]  # per channel: sum of the values 0..255
    squares: tuple[int, ...]  # per channel: sum of their squares
    pixels: int  # per channel: H x W

    @classmethod
    def of(cls, image: np.ndarray) -> "ImageSums":
        """``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` uint8 -> one or three channels' sums."""
        values = image.reshape(image.shape[0] * image.shape[1], -1).astype(np.int64)
        return cls(tuple(int(v) for v in values.sum(0)), tuple(int(v) for v in (values * values).sum(0)), len(values))


@dataclass
class PixelStatistics:
    """Per-channel mean and std of the pixel values (0..255) of the images a split holds, for
    the manifest: the model standardises its encoder's input with them (``model.input_mean``).

    The sums are exact integers, so the figures do not depend on the order the images come in
    (or on ``--workers``). A grayscale image counts for each of R, G and B when the split also
    holds colour images, since the loader then turns it into RGB; a split of grayscale images
    only has one channel. For ``--format jpg``/``webp`` these are the pixels before lossy
    encoding (a decoded image differs by the compression error)."""

    sums: list[int] = field(default_factory=lambda: [0, 0, 0])
    squares: list[int] = field(default_factory=lambda: [0, 0, 0])
    pixels: int = 0
    images: int = 0
    all_grayscale: bool = True

    def add(self, image: ImageSums) -> None:
        grayscale = len(image.sums) == 1
        for c in range(3):
            self.sums[c] += image.sums[0 if grayscale else c]
            self.squares[c] += image.squares[0 if grayscale else c]
        self.pixels += image.pixels
        self.images += 1
        self.all_grayscale &= grayscale

    def summary(self) -> dict[str, Any]:
        """``{"mean": [...], "std": [...], "pixels": N}``, one value per channel; N is the
        number of pixels per channel, the weight when several splits are pooled."""
        channels = 1 if self.all_grayscale else 3
        n = self.pixels
        # Var = (n * sum(x^2) - sum(x)^2) / n^2: computed on exact integers, then divided.
        variances = [(n * self.squares[c] - self.sums[c] ** 2) / n**2 for c in range(channels)]
        return {
            "mean": [self.sums[c] / n for c in range(channels)],
            "std": [max(v, 0.0) ** 0.5 for v in variances],
            "pixels": n,
        }


# How PIL's convert("L") weighs R, G and B: what the loader does to colour images for a
# grayscale model.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _as_channels(stats: dict[str, Any], channels: int) -> tuple[list[float], list[float]]:
    """A split's (mean, std) for a model of ``channels`` channels, as the loader feeds it.

    Grayscale read as RGB repeats the channel: exact. RGB read as grayscale takes the luma
    mean (exact) and the same weighting of the channel stds, an upper bound of the luma's std
    (the channels' covariances are not stored), which is close for natural images, whose
    channels move together."""
    mean, std = list(stats["mean"]), list(stats["std"])
    if len(mean) == channels:
        return mean, std
    if channels == 3:
        return mean * 3, std * 3
    return [sum(w * m for w, m in zip(LUMA_WEIGHTS, mean))], [sum(w * d for w, d in zip(LUMA_WEIGHTS, std))]


def pooled_pixel_statistics(splits: list[dict[str, Any]], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) over several splits' ``pixel_stats``, as if they were one set:
    each weighted by its pixel count, through E[x] and E[x^2]."""
    total = sum(s["pixels"] for s in splits)
    first = [0.0] * channels
    second = [0.0] * channels
    for stats in splits:
        weight = stats["pixels"] / total
        for c, (m, d) in enumerate(zip(*_as_channels(stats, channels))):
            first[c] += weight * m
            second[c] += weight * (d * d + m * m)
    return first, [max(e2 - m * m, 0.0) ** 0.5 for m, e2 in zip(first, second)]


class EncodedSample(NamedTuple):
    key: str
    extension: str
    payload: bytes
    meta: dict[str, Any]
    shape: tuple[int, ...]  # of the image that was encoded: (H, W) or (H, W, 3)
    sums: ImageSums  # of the same image, for the split's pixel statistics


def encode_chunk(options: EncodeOptions, chunk: list[Sample]) -> list[EncodedSample]:
    """Prepare and encode a list of samples (the unit of work of one worker task). The pixel
    sums are taken here too, while the pixels are at hand, rather than decoding them again."""
    encoded = []
    for key, image, meta in chunk:
        pixels = prepare_image(image, options.resolution, options.channels)
        payload = encode_image(pixels, options.image_format, options.quality)
        encoded.append(EncodedSample(key, options.image_format, payload, meta, pixels.shape, ImageSums.of(pixels)))
    return encoded


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def encode_samples(
    samples: Iterable[Sample], options: EncodeOptions, workers: int = 1, chunk_size: int = 64
) -> Iterator[EncodedSample]:
    """Encoded samples, in input order, with the same bytes whatever ``workers`` is.

    Workers get chunks of samples (one image is too little work to be worth a message) through
    an ordered ``imap``, so the output order is the input order. Input is read ahead only as far
    as the pipe to the workers holds, so a large folder is not decoded into memory all at once.
    """
    encode = functools.partial(encode_chunk, options)
    if workers <= 1:
        for chunk in chunked(samples, chunk_size):
            yield from encode(chunk)
        return
    with multiprocessing.Pool(workers) as pool:
        for encoded in pool.imap(encode, chunked(samples, chunk_size)):
            yield from encoded


# --- tar shards -----------------------------------------------------------------------------


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _member_bytes(payload_size: int) -> int:
    """What one member adds to a tar: a 512-byte header, the payload padded to 512 bytes."""
    return tarfile.BLOCKSIZE + -(-payload_size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _closed_tar_bytes(offset: int) -> int:
    """The size of a tar closed at ``offset``: two zero blocks end it, and ``tarfile`` pads the
    file to a whole record (20 blocks, 10 KiB), so no shard is smaller than 10 KiB."""
    end = offset + 2 * tarfile.BLOCKSIZE
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def file_sha256(path: Path) -> str:
    """A file's sha256 (shards, checkpoints), read in 1 MiB blocks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(1 << 20))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(buffer[:n])
    return digest.hexdigest()


@dataclass
class SplitWriter:
    """Writes one split (``train``, ``heldout``...) as ``<split>-000000.tar``, ``-000001``...
    (``<prefix>-<split>-000000.tar`` with a prefix).

    A shard is closed after ``samples_per_shard`` samples, or before the sample that would take
    it over ``bytes_per_shard`` bytes (a sample larger than that gets a shard of its own).
    """

    out_dir: Path
    split: str
    samples_per_shard: int | None = None
    bytes_per_shard: int | None = None
    prefix: str | None = None
    image_format: str = "png"  # for images given to ``write`` as arrays
    quality: int | None = None
    shards: list[dict[str, Any]] = field(default_factory=list)
    statistics: PixelStatistics = field(default_factory=PixelStatistics)
    _tar: tarfile.TarFile | None = None
    _count: int = 0

    def __post_init__(self) -> None:
        if self.samples_per_shard is None and self.bytes_per_shard is None:
            raise ValueError("give samples_per_shard or bytes_per_shard")

    @property
    def stem(self) -> str:
        return f"{self.prefix}-{self.split}" if self.prefix else self.split

    def _open_next(self) -> None:
        name = f"{self.stem}-{len(self.shards):06d}.tar"
        self._tmp = self.out_dir / f".{name}.tmp"
        self._name = name
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.out_dir / self._name
        os.replace(self._tmp, final)
        self.shards.append(
            {"name": self._name, "samples": self._count, "bytes": final.stat().st_size, "sha256": file_sha256(final)}
        )
        self._tar = None

    def _would_overflow(self, members: list[tuple[str, bytes]]) -> bool:
        if self.bytes_per_shard is None or self._tar is None or self._count == 0:
            return False
        added = sum(_member_bytes(len(payload)) for _, payload in members)
        return _closed_tar_bytes(self._tar.offset + added) > self.bytes_per_shard

    def write_encoded(
        self, key: str, extension: str, payload: bytes, meta: dict[str, Any], sums: ImageSums | None = None
    ) -> None:
        """Add one sample whose image is already encoded as ``extension`` (png, jpg, webp);
        ``sums`` (of its pixels) go into the split's pixel statistics."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits on them)")
        members = [(f"{key}.{extension}", payload), (f"{key}.json", json.dumps(meta, sort_keys=True).encode())]
        if self._would_overflow(members):
            self._close_current()
        if self._tar is None:
            self._open_next()
        for name, data in members:
            _add_member(self._tar, name, data)
        self._count += 1
        if sums is not None:
            self.statistics.add(sums)
        if self._count == self.samples_per_shard:
            self._close_current()

    def write(self, key: str, image: np.ndarray, meta: dict[str, Any]) -> None:
        """Add one sample: ``image`` is ``(H, W)`` or ``(H, W, C)`` uint8."""
        payload = encode_image(image, self.image_format, self.quality)
        self.write_encoded(key, self.image_format, payload, meta, ImageSums.of(image))

    def close(self) -> dict[str, Any]:
        """Finish the last shard; returns the split's manifest entry, with ``pixel_stats``
        (see ``PixelStatistics.summary``) when every sample came with its pixel sums."""
        self._close_current()
        n = len(self.shards)
        entry = {
            "pattern": f"{self.stem}-{{{0:06d}..{max(n - 1, 0):06d}}}.tar",
            "samples": sum(s["samples"] for s in self.shards),
            "shards": self.shards,
        }
        if entry["samples"] and self.statistics.images == entry["samples"]:
            entry["pixel_stats"] = self.statistics.summary()
        return entry

    def abort(self) -> None:
        """Drop the shard being written (after an error), so no temporary file is left behind."""
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (a reader sees the old one or the new one, whole)."""
    out = Path(out_dir)
    tmp = out / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / MANIFEST_NAME)


def write_dataset(
    out_dir: str | Path,
    splits: dict[str, Iterable[tuple[str, np.ndarray, dict[str, Any]]]],
    samples_per_shard: int | None = None,
    info: dict[str, Any] | None = None,
    *,
    bytes_per_shard: int | None = None,
    prefix: str | None = None,
    image_format: str = "png",
    quality: int | None = None,
) -> dict[str, Any]:
    """Write each split's ``(key, image, meta)`` samples to shards; the manifest goes last, so
    its presence means the dataset is complete. Returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"container": "webdataset-tar", "format": image_format, **(info or {}), "splits": {}}
    for split, samples in splits.items():
        writer = SplitWriter(out, split, samples_per_shard, bytes_per_shard, prefix, image_format, quality)
        try:
            for key, image, meta in samples:
                writer.write(key, image, meta)
        except BaseException:
            writer.abort()
            raise
        manifest["splits"][split] = writer.close()
    write_manifest(out, manifest)
    return manifest


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.exists() else None


def split_urls(out_dir: str | Path, manifest: dict[str, Any], split: str) -> str:
    """The brace-pattern URL of one split of a written dataset."""
    if split not in manifest["splits"]:
        raise KeyError(f"no split '{split}' in {out_dir}; it has {', '.join(manifest['splits'])}")
    return str(Path(out_dir) / manifest["splits"][split]["pattern"])


# --- from a source to a dataset ---------------------------------------------------------------


def split_of(key: str, heldout_fraction: float, seed: int) -> str:
    """``"heldout"`` for a seeded pseudo-random ``heldout_fraction`` of keys, else ``"train"``.

    Decided by a hash of (seed, key) rather than by shuffling a list: it needs no count of the
    samples up front (a folder is read once, as a stream), and a sample stays in its split when
    ``--limit`` changes or files are added. The held-out share is therefore ``F`` on average,
    not exactly ``round(F * N)``.
    """
    if heldout_fraction <= 0:
        return "train"
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") < heldout_fraction * 2**64 else "train"


def describe_images(shapes: set[tuple[int, ...]]) -> tuple[int | list[int] | None, int]:
    """``(image_size, channels)`` for the manifest from the shapes written: ``image_size`` is the
    side of uniform square images, ``[H, W]`` of uniform other ones, None if sizes vary;
    ``channels`` is 1 if every image is grayscale, else 3 (the loader converts the rest)."""
    sizes = {shape[:2] for shape in shapes}
    channels = 1 if all(len(shape) == 2 for shape in shapes) else 3
    if len(sizes) != 1:
        return None, channels
    height, width = next(iter(sizes))
    return (height if height == width else [height, width]), channels


def write_shards(
    out_dir: str | Path,
    samples: Iterable[Sample],
    *,
    samples_per_shard: int | None = None,
    bytes_per_shard: int | None = None,
    options: EncodeOptions = EncodeOptions(),
    heldout_fraction: float = 0.0,
    seed: int = 0,
    prefix: str | None = None,
    workers: int = 1,
    info: dict[str, Any] | None = None,
    skipped: Skipped | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Encode ``samples``, route each to its split, write the shards, then the manifest.

    ``info`` is added to the manifest as it is; ``skipped`` (filled by the source's reader while
    it is read) goes in as ``{"count", "files"}``. Splits that receive no sample are left out of
    the manifest (with a warning). Raises SourceError when there is no sample at all. Returns the
    manifest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writers: dict[str, SplitWriter] = {}
    shapes: set[tuple[int, ...]] = set()
    stream = encode_samples(samples, options, workers)
    if progress:
        from tqdm import tqdm

        stream = tqdm(stream, unit="img", desc="writing shards", file=sys.stderr, disable=None)
    try:
        for sample in stream:
            split = split_of(sample.key, heldout_fraction, seed)
            if split not in writers:
                writers[split] = SplitWriter(out, split, samples_per_shard, bytes_per_shard, prefix)
            writers[split].write_encoded(sample.key, sample.extension, sample.payload, sample.meta, sample.sums)
            shapes.add(sample.shape)
        summaries = {split: writers[split].close() for split in SPLITS if split in writers}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    if not summaries:
        raise SourceError("the source gave no images to write")
    wanted = SPLITS if heldout_fraction > 0 else ("train",)
    for split in wanted:
        if split not in summaries:
            log.warning("no sample fell into the %s split; it is left out of the manifest", split)
    image_size, channels = describe_images(shapes)
    manifest = {
        "container": "webdataset-tar",
        "format": options.image_format,
        "name": prefix,
        "image_size": image_size,
        "channels": channels,
        **(info or {}),
        "splits": summaries,
    }
    if skipped is not None:
        manifest["skipped"] = {"count": len(skipped.files), "files": skipped.files}
    write_manifest(out, manifest)
    return manifest


# --- command line -----------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def byte_size(text: str) -> int:
    """``"1000"``, ``"64K"``/``"64KiB"`` (x1024), ``"64KB"`` (x1000), likewise M and G (as GNU
    ``split -b``)."""
    match = re.fullmatch(r"\s*(\d+)\s*(([KMG])(i?B)?)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 50000000, 64M, 1GB)")
    number, unit, letter, suffix = int(match[1]), match[2], match[3], match[4]
    if unit:
        base = 1000 if suffix and suffix.upper() == "B" else 1024
        number *= base ** ("KMG".index(letter.upper()) + 1)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline-shards",
        description="Write images (a folder, idx/MNIST files, CIFAR batches or a list of paths) "
        "as WebDataset tar shards plus manifest.json.",
        epilog="For shards that exist already, `pipeline-shards index SHARDS --out manifest.json` writes only the "
        "manifest (see `pipeline-shards index --help`); `pipeline-shards verify MANIFEST` checks shards against "
        "their manifest (sha256, sample counts, image size).",
    )
    parser.add_argument(
        "source", help="image folder, idx(.gz) images file, CIFAR batch or folder, or text file of paths"
    )
    parser.add_argument("out_dir", help="output directory (created if missing)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--samples-per-shard", type=positive_int, metavar="N", help="samples per shard")
    size.add_argument("--bytes-per-shard", type=byte_size, metavar="B", help="largest shard size (e.g. 64M)")
    parser.add_argument("--kind", choices=KINDS, help="source kind (default: guessed from the path)")
    parser.add_argument("--labels", metavar="PATH", help="idx labels file (default: the one beside the images)")
    parser.add_argument("--resolution", type=positive_int, metavar="R", help="short side to R (Lanczos), crop RxR")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="1 or 3 (default: keep grayscale, else RGB)")
    parser.add_argument("--format", dest="image_format", choices=IMAGE_FORMATS, default="png", help="image encoding")
    parser.add_argument("--quality", type=int, metavar="Q", help=f"jpg/webp quality 1-100 (default {DEFAULT_QUALITY})")
    parser.add_argument("--workers", type=positive_int, default=1, metavar="N", help="encoding processes")
    parser.add_argument("--heldout-fraction", type=fraction, default=0.0, metavar="F", help="held-out share, 0<=F<1")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/heldout split")
    parser.add_argument("--name", help="dataset name; shards are named NAME-<split>-000000.tar")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="only the first N samples (for quick tries)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Errors argparse cannot see on its own; ``parser.error`` exits with status 2. (A missing
    or unreadable source is reported by ``open_source``, also with status 2.)"""
    if args.quality is not None:
        if args.image_format == "png":
            parser.error("--quality applies to --format jpg or webp only (png is lossless)")
        if not 1 <= args.quality <= 100:
            parser.error(f"--quality must be in 1..100, got {args.quality}")
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name):
        parser.error(f"--name {args.name!r} may hold only letters, digits, '_', '-' and '.'")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        parser.error(f"output {args.out_dir} exists and is not a directory")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["index"]:  # (a source folder named "index" is still ./index)
        from pipeline.data.indexer import main as index_main

        return index_main(argv[1:])
    if argv[:1] == ["verify"]:
        from pipeline.data.verify import main as verify_main

        return verify_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format=f"{parser.prog}: %(message)s", stream=sys.stderr)
    skipped = Skipped()
    try:
        kind, samples = open_source(args.source, args.kind, args.labels, skipped)
        if args.limit is not None:
            samples = itertools.islice(samples, args.limit)
        manifest = write_shards(
            args.out_dir,
            samples,
            samples_per_shard=args.samples_per_shard,
            bytes_per_shard=args.bytes_per_shard,
            options=EncodeOptions(args.resolution, args.channels, args.image_format, args.quality),
            heldout_fraction=args.heldout_fraction,
            seed=args.seed,
            prefix=args.name,
            workers=args.workers,
            info={"source": {"kind": kind, "path": str(Path(args.source).resolve())}, "args": vars(args)},
            skipped=skipped,
            progress=True,
        )
    except SourceError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    splits = manifest["splits"].items()
    counts = ", ".join(f"{split}: {s['samples']} samples in {len(s['shards'])} shards" for split, s in splits)
    log.info("wrote %s (%s)", Path(args.out_dir) / MANIFEST_NAME, counts)
    if skipped.files:
        log.warning("skipped %d unreadable file(s)", len(skipped.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
