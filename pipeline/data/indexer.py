"""The shard indexer: ``manifest.json`` for WebDataset shards written elsewhere (img2dataset,
``webdataset.TarWriter``, one's own scripts), so that epoch mode and evaluation can read them::

    pipeline-shards index '/data/shards/{00000..00099}.tar' --out /data/shards/manifest.json
    pipeline-shards index 'train=/data/train-{000..009}.tar' 'heldout=/data/val-{0..1}.tar' --out m/manifest.json

The manifest is the shard writer's (per shard: name, sample count, bytes, sha256; the image
size and channels; per split the pixel statistics), so the loader reads it the same way.

Each shard is read once, front to back, local or over ``http(s)://``, several at a time in
threads (hashing and HTTP release the GIL): every byte goes through sha256 while the tar
headers are read. No image is decoded except a few per shard (``--sample-images``, chosen at
random but the same every time) to learn the image size and channels and to estimate the
pixel statistics; the manifest says how many were checked and whether they were uniform.

Samples are formed by webdataset's own rule (``streams.split_key``: the key is the path up to
the first dot of the file name) and counted as the loader counts them: the samples that hold
an image member (png, jpg, jpeg, webp). Samples without one are counted per shard and named in
a warning, not dropped silently.

Shard names are written as the loader resolves them (relative to the manifest's folder): a
local shard under the manifest's folder by its relative path, as the shard writer names its
own; any other shard by its absolute path or URL, so the manifest works from wherever training
runs (``--absolute`` for absolute paths throughout).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import gzip
import hashlib
import http.client
import io
import logging
import os
import random
import re
import sys
import time
import urllib.error
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.data.shards import MANIFEST_NAME, ImageSums, PixelStatistics, describe_images, write_manifest
from pipeline.data.sources import GRAY_MODES
from pipeline.data.streams import (
    IMAGE_EXTENSIONS,
    DataError,
    StreamOptions,
    TarMembers,
    is_gzipped,
    is_remote,
    local_path,
    open_url,
)

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_IMAGES = 4  # per shard
EXAMPLES = 5  # keys of samples without an image kept per shard, to name in the report
# Image formats the loader does not decode: a sample holding only these has "no image".
OTHER_IMAGE_FORMATS = {"bmp", "gif", "tif", "tiff", "ppm", "pgm", "pnm", "jp2", "heic", "avif"}
_SPLIT_PREFIX = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]*)=(.+)")
_READ_ERRORS = (OSError, http.client.HTTPException, urllib.error.URLError, EOFError, ValueError, UnicodeDecodeError)


# --- which shards -----------------------------------------------------------------------------


def expand(spec: str) -> list[str]:
    """One argument -> shard URLs: ``@FILE`` (a text file, one URL or path per line), a local
    glob (``/data/*.tar``), or brace patterns (several joined by ``::``) and plain URLs."""
    if spec.startswith("@"):
        lines = [line.strip() for line in Path(spec[1:]).read_text().splitlines()]
        return [url for line in lines if line and not line.startswith("#") for url in expand(line)]
    if not is_remote(spec) and any(c in spec for c in "*?["):
        found = sorted(glob.glob(spec))
        if not found:
            raise DataError(f"no file matches {spec}")
        return found
    return wds.shardlists.expand_urls(spec)


def parse_specs(specs: list[str], default_split: str) -> dict[str, list[str]]:
    """``[SPLIT=]SHARDS`` arguments -> {split: shard URLs}, in the order given."""
    splits: dict[str, list[str]] = {}
    for spec in specs:
        match = _SPLIT_PREFIX.fullmatch(spec)
        split, shards = (match[1], match[2]) if match else (default_split, spec)
        splits.setdefault(split, []).extend(expand(shards))
    return splits


# --- one shard --------------------------------------------------------------------------------


class _Hashed:
    """Reads through ``stream``, feeding every byte to sha256 and counting them."""

    def __init__(self, stream) -> None:
        self.stream, self.digest, self.bytes = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Read to the end (what follows the tar's end blocks still belongs to the file)."""
        while self.read(1 << 20):
            pass


@dataclass
class ImageCheck:
    """What decoding one sampled image found."""

    key: str
    shape: tuple[int, ...] | None = None  # (H, W) grayscale or (H, W, 3), as ``describe_images`` takes
    mode: str | None = None  # PIL's
    sums: ImageSums | None = None
    error: str | None = None


def check_image(key: str, ext: str, payload: bytes) -> ImageCheck:
    """Decode one image as the loader would: grayscale modes stay one channel, others RGB."""
    try:
        with Image.open(io.BytesIO(payload)) as image:
            mode = image.mode
            pixels = np.asarray(image.convert("L" if mode in GRAY_MODES else "RGB"))
    except Exception as err:  # any decoder failure: the loader would skip it as corrupt
        return ImageCheck(key, error=f"{ext}: {err}")
    return ImageCheck(key, pixels.shape, mode, ImageSums.of(pixels))


@dataclass
class ShardScan:
    url: str
    samples: int = 0  # samples with an image member: what the loader reads
    without_image: int = 0
    without_image_keys: list[str] = field(default_factory=list)  # the first few
    bytes: int = 0
    sha256: str = ""
    formats: Counter = field(default_factory=Counter)  # the image the loader picks, per sample
    members: Counter = field(default_factory=Counter)  # every member's extension
    images: list[ImageCheck] = field(default_factory=list)  # the decoded sample of images
    error: str | None = None


def scan_shard(url: str, options: StreamOptions, sample_images: int | None) -> ShardScan:
    """Count, hash and sample one shard; ``sample_images`` None decodes every image. A remote
    shard that fails is read again from the start, up to ``options.retries`` times."""
    for attempt in range(options.retries + 1 if is_remote(url) else 1):
        try:
            return _scan(url, options, sample_images)
        except DataError:
            raise
        except _READ_ERRORS as err:
            error = f"{type(err).__name__}: {err}"
            if attempt < options.retries and is_remote(url):
                log.warning("shard %s failed (%s); reading it again", url, error)
                time.sleep(options.backoff * 2**attempt)
    return ShardScan(url, error=error)


def _scan(url: str, options: StreamOptions, sample_images: int | None) -> ShardScan:
    scan = ShardScan(url)
    rng = random.Random(url)  # which images are decoded: random, but the same every run
    kept: list[tuple[str, str, bytes]] = []  # reservoir of (key, extension, bytes) to decode
    key, images, chosen = None, {}, False

    def end_sample() -> None:
        if key is None:
            return
        if not images:
            scan.without_image += 1
            if len(scan.without_image_keys) < EXAMPLES:
                scan.without_image_keys.append(key)
            return
        ext = next(e for e in IMAGE_EXTENSIONS if e in images)  # the loader's choice (find_image)
        scan.formats[ext] += 1
        if sample_images is None:
            scan.images.append(check_image(key, ext, images[ext]))
        elif chosen:
            slot = len(kept) if len(kept) < sample_images else rng.randrange(sample_images)
            kept[slot : slot + 1] = [(key, ext, images[ext])]
        scan.samples += 1

    with open_url(url, options) as raw:
        hashed = _Hashed(raw)
        stream = gzip.GzipFile(fileobj=hashed) if is_gzipped(url) else hashed
        members = TarMembers(stream, seekable=False)
        for member_key, ext, _ in members:
            scan.members[ext] += 1
            if member_key != key:
                end_sample()
                key, images, chosen = member_key, {}, False
            if ext in IMAGE_EXTENSIONS:
                if not images:  # the sample's first image: decide now whether its bytes are kept
                    seen = scan.samples  # image samples before this one
                    chosen = sample_images is None or seen < sample_images or rng.randrange(seen + 1) < sample_images
                images[ext] = members.read() if chosen else b""
        end_sample()
        if is_gzipped(url):
            stream.read()  # the gzip stream's own end (its trailer is checked there)
        hashed.drain()
    scan.bytes, scan.sha256 = hashed.bytes, hashed.digest.hexdigest()
    scan.images += [check_image(*image) for image in kept]
    return scan


# --- the manifest -----------------------------------------------------------------------------


def shard_name(url: str, manifest_dir: Path, absolute: bool = False) -> str:
    """How the manifest names a shard, as ``urls.shard_url`` resolves it: relative to the
    manifest's folder when the shard lies under it, else an absolute path or URL."""
    path = local_path(url)
    if path is None:
        return url
    path, manifest_dir = Path(os.path.abspath(path)), Path(os.path.abspath(manifest_dir))
    if not absolute and path.is_relative_to(manifest_dir):
        return path.relative_to(manifest_dir).as_posix()
    return path.as_posix()


def describe_checks(checks: list[ImageCheck], samples: int) -> tuple[dict[str, Any], Any, int | None]:
    """The manifest's ``image_check`` (how many images were decoded, of how many, with which
    sizes and modes), and its ``image_size`` and ``channels``, as ``describe_images`` gives
    them for the decoded images."""
    good = [c for c in checks if c.error is None]
    sizes = Counter("x".join(map(str, c.shape[:2])) for c in good)
    image_size, channels = describe_images({c.shape for c in good}) if good else (None, None)
    report = {
        "decoded": len(checks),
        "samples": samples,
        "all_checked": len(checks) == samples,
        "uniform_size": len(sizes) == 1 if good else None,  # None: no image decoded, nothing known
        "sizes": dict(sizes.most_common()),
        "modes": dict(Counter(c.mode for c in good).most_common()),
        "undecodable": [f"{c.key}: {c.error}" for c in checks if c.error is not None],
    }
    return report, image_size, channels


def shard_entry(scan: ShardScan, manifest_dir: Path, absolute: bool) -> dict[str, Any]:
    """The shard writer's entry for a shard, with its samples that hold no image."""
    name = shard_name(scan.url, manifest_dir, absolute)
    return {"name": name, "samples": scan.samples, "bytes": scan.bytes, "sha256": scan.sha256,
            "without_image": scan.without_image}  # fmt: skip


def split_entry(scans: list[ShardScan], manifest_dir: Path, absolute: bool) -> dict[str, Any]:
    """A split's manifest entry: the shard writer's fields, plus the samples without an image
    and the member extensions seen."""
    entry: dict[str, Any] = {
        "samples": sum(s.samples for s in scans),
        "shards": [shard_entry(s, manifest_dir, absolute) for s in scans],
        "without_image": sum(s.without_image for s in scans),
        "without_image_examples": [f"{s.url}#{k}" for s in scans for k in s.without_image_keys][:EXAMPLES],
        "members": dict(sum((s.members for s in scans), Counter()).most_common()),
    }
    statistics = PixelStatistics()
    decoded = [c for s in scans for c in s.images if c.sums is not None]
    for check in decoded:
        statistics.add(check.sums)
    if decoded:
        # From the decoded images only, unless every image was: then they are the split's.
        entry["pixel_stats"] = statistics.summary()
        if len(decoded) < entry["samples"]:
            entry["pixel_stats"]["estimated_from_images"] = len(decoded)
    return entry


def build_manifest(
    splits: dict[str, list[ShardScan]], manifest_dir: Path, absolute: bool = False, info: dict | None = None
) -> dict[str, Any]:
    scans = [s for split in splits.values() for s in split]
    formats = sum((s.formats for s in scans), Counter())
    check, image_size, channels = describe_checks([c for s in scans for c in s.images], sum(s.samples for s in scans))
    return {
        "container": "webdataset-tar",
        "format": next(iter(formats)) if len(formats) == 1 else "mixed",
        "formats": dict(formats.most_common()),
        "image_size": image_size,
        "channels": channels,
        "image_check": check,
        **(info or {}),
        "splits": {name: split_entry(split, manifest_dir, absolute) for name, split in splits.items()},
    }


def index_shards(
    splits: dict[str, list[str]],
    out: str | Path,
    *,
    workers: int = 8,
    sample_images: int | None = DEFAULT_SAMPLE_IMAGES,
    absolute: bool = False,
    skip_bad: bool = False,
    options: StreamOptions | None = None,
    info: dict | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Scan every shard of ``splits`` ({split: URLs}) and write ``out`` (a ``manifest.json``
    path or its folder); returns the manifest. A shard that cannot be read is an error
    (DataError naming each), unless ``skip_bad``: then it is left out and listed under
    ``skipped``."""
    out = manifest_path(out)
    if out.name != MANIFEST_NAME:
        raise DataError(f"the manifest must be named {MANIFEST_NAME} (the loader knows it by its name), not {out.name}")
    options = options or StreamOptions()
    urls = [u for split in splits.values() for u in split]
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(lambda u: scan_shard(u, options, sample_images), urls)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(urls), unit="shard", desc="indexing", file=sys.stderr, disable=None)
        scans = list(results)
    bad = [s for s in scans if s.error is not None]
    if bad and not skip_bad:
        raise DataError(f"{len(bad)} of {len(scans)} shards cannot be read (--skip-bad leaves them out): "
                        + "; ".join(f"{s.url}: {s.error}" for s in bad[:10]))  # fmt: skip
    by_url = iter(scans)
    read = {name: [s for s in (next(by_url) for _ in split) if s.error is None] for name, split in splits.items()}
    manifest = build_manifest(read, out.parent, absolute, info)
    if bad:
        manifest["skipped"] = {"count": len(bad), "files": [f"{s.url}: {s.error}" for s in bad]}
    if not any(entry["samples"] for entry in manifest["splits"].values()):
        raise DataError(f"no sample with an image member ({', '.join(IMAGE_EXTENSIONS)}) in {len(scans)} shards")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(out.parent, manifest)
    return manifest


def report(manifest: dict[str, Any], out: Path) -> None:
    """What a user must know about the indexed shards, on stderr."""
    for name, entry in manifest["splits"].items():
        log.info("%s: %d samples in %d shards", name, entry["samples"], len(entry["shards"]))
        if entry["without_image"]:
            others = sorted(set(entry["members"]) & OTHER_IMAGE_FORMATS)
            log.warning("%s: %d samples have no %s member and are not counted (the loader skips them)%s; e.g. %s",
                        name, entry["without_image"], "/".join(IMAGE_EXTENSIONS),
                        f" ({', '.join(others)} members are not read)" if others else "",
                        ", ".join(entry["without_image_examples"]))  # fmt: skip
        if not entry["samples"]:
            log.warning("%s: no sample with an image: epoch mode cannot read this split", name)
    check = manifest["image_check"]
    if check["undecodable"]:
        failed = check["undecodable"]
        log.warning("%d of %d decoded images failed (the loader will skip such samples): %s",
                    len(failed), check["decoded"], "; ".join(failed[:EXAMPLES]))  # fmt: skip
    if check["uniform_size"] is None:
        log.info("no image decoded: the image size and channels are not in the manifest (see --sample-images)")
    elif not check["uniform_size"]:
        log.warning("the decoded images have different sizes (%s): a model trains on one size, and the loader "
                    "skips an image whose size differs from the rest of its batch", check["sizes"])  # fmt: skip
    elif not check["all_checked"]:
        log.info("image size %s, channels %s: from %d decoded images of %d (--sample-images all checks every one)",
                 manifest["image_size"], manifest["channels"], check["decoded"], check["samples"])  # fmt: skip
    if "skipped" in manifest:
        log.warning("left out %d unreadable shards: %s", manifest["skipped"]["count"], manifest["skipped"]["files"])
    log.info("wrote %s", out)


# --- command line -----------------------------------------------------------------------------


def sample_count(text: str) -> int | None:
    if text == "all":
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, or 'all', got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline-shards index",
        description="Write manifest.json for existing WebDataset shards (img2dataset, webdataset.TarWriter, ...), "
        "so that training reads them in epoch mode and evaluates on them.",
        epilog="Then train with data.train_urls=OUT#train data.eval_urls=OUT#heldout.",
    )
    parser.add_argument(
        "shards", nargs="+", metavar="[SPLIT=]SHARDS",
        help="a brace pattern ('/data/{00000..00099}.tar'; several joined by '::'), a shard path or http(s) URL, "
        "a local glob ('/data/*.tar'), or @FILE (one per line); SPLIT= puts them in that split",
    )  # fmt: skip
    parser.add_argument("--out", metavar="PATH", help="the manifest.json to write, or its folder (default: beside "
                        "the shards, when they are local and in one folder)")  # fmt: skip
    parser.add_argument("--split", default="train", help="split of the shards given without SPLIT= (default: train)")
    parser.add_argument("--workers", type=int, default=8, metavar="N", help="shards read at once (threads)")
    parser.add_argument("--sample-images", type=sample_count, default=DEFAULT_SAMPLE_IMAGES, metavar="K",
                        help=f"images decoded per shard to learn size, channels and pixel statistics "
                        f"(default {DEFAULT_SAMPLE_IMAGES}; 'all' decodes every one)")  # fmt: skip
    parser.add_argument("--absolute", action="store_true", help="name local shards by absolute path")
    parser.add_argument("--skip-bad", action="store_true", help="leave unreadable shards out instead of failing")
    parser.add_argument("--name", help="dataset name, kept in the manifest")
    return parser


def default_out(splits: dict[str, list[str]]) -> Path | None:
    """``manifest.json`` in the shards' folder, when they are all local and in one."""
    paths = [local_path(u) for urls in splits.values() for u in urls]
    if any(p is None for p in paths):
        return None
    folders = {Path(os.path.abspath(p)).parent for p in paths}
    return folders.pop() / MANIFEST_NAME if len(folders) == 1 else None


def manifest_path(out: str | Path) -> Path:
    """``--out``: the manifest.json to write, or the folder to write it in."""
    out = Path(out)
    return out / MANIFEST_NAME if out.is_dir() or out.suffix != ".json" else out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    logging.basicConfig(level=logging.INFO, format="pipeline-shards: %(message)s", stream=sys.stderr)
    try:
        splits = parse_specs(args.shards, args.split)
        out = Path(args.out) if args.out else default_out(splits)
        if out is None:
            parser.error("--out is needed when the shards are remote or in several folders")
        info = {"name": args.name, "source": {"kind": "webdataset-shards", "shards": args.shards}, "args": vars(args)}
        manifest = index_shards(splits, out, workers=args.workers, sample_images=args.sample_images,
                                absolute=args.absolute, skip_bad=args.skip_bad, info=info, progress=True)  # fmt: skip
    except (DataError, OSError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    report(manifest, manifest_path(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
