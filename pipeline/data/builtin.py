"""The embedded default dataset: 32x32 RGB crops of the photographs scikit-image ships.

No download: the photographs are files inside the installed ``skimage`` package. Each photo is
resized so its short side is 256, 384 and 512 pixels, then cut into non-overlapping 32x32 crops
(~4,000 in all), which are split into train and held-out sets by a seeded permutation.
"""

from __future__ import annotations

import fcntl
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.shards import read_manifest, split_urls, write_dataset

# Bump when the crops or the manifest change, so old caches are not reused. 2: the manifest
# holds each split's pixel statistics (the crops are those of version 1).
VERSION = 2
PHOTOS = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
]
SHORT_SIDES = (256, 384, 512)
CROP = 32
HELDOUT_FRACTION = 0.1
SAMPLES_PER_SHARD = 256


def _photo_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def builtin_crops() -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, (32, 32, 3) uint8)`` crops in a fixed order."""
    for filename in PHOTOS:
        with Image.open(_photo_dir() / filename) as photo:
            photo = photo.convert("RGB")
            for short in SHORT_SIDES:
                scale = short / min(photo.size)
                resized = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.LANCZOS)
                pixels = np.asarray(resized)
                stem = filename.split(".")[0]
                for top in range(0, pixels.shape[0] - CROP + 1, CROP):
                    for left in range(0, pixels.shape[1] - CROP + 1, CROP):
                        crop = pixels[top : top + CROP, left : left + CROP]
                        if crop.std() < 2.0:  # flat background (retina's black border): nothing to learn
                            continue
                        yield f"{stem}_s{short}_{top:04d}_{left:04d}", np.ascontiguousarray(crop)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hvae-pipeline"


def ensure_builtin_dataset(cache_dir: str | Path | None = None, seed: int = 0) -> tuple[str, str]:
    """Write the embedded dataset's shards once; return the (train, held-out) URL patterns.

    Safe to call from several processes at once: the first takes a file lock and writes, the
    others wait for it and then find the manifest.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / f"builtin-photos-v{VERSION}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(out)
        if manifest is None:
            crops = list(builtin_crops())
            order = list(range(len(crops)))
            random.Random(seed).shuffle(order)
            n_heldout = int(len(crops) * HELDOUT_FRACTION)
            heldout, train = sorted(order[:n_heldout]), sorted(order[n_heldout:])

            def samples(indices: list[int]):
                for i in indices:
                    key, image = crops[i]
                    yield key, image, {"source": "skimage.data", "key": key}

            info = {"name": "builtin-photos", "version": VERSION, "image_size": CROP, "channels": 3, "seed": seed}
            manifest = write_dataset(out, {"train": samples(train), "heldout": samples(heldout)}, SAMPLES_PER_SHARD, info)
    return split_urls(out, manifest, "train"), split_urls(out, manifest, "heldout")
