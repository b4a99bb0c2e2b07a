"""The shard writer: images -> WebDataset tar shards + ``manifest.json``.

Each sample is two tar members sharing a key: ``<key>.png`` (the image, lossless) and
``<key>.json`` (its metadata). Shards are written by hand with ``tarfile`` rather than with
``webdataset.TarWriter`` because we want byte-identical output for identical input (fixed
mtime, owner and mode; PNG without timestamps), so a shard's sha256 in the manifest identifies
its content, and each shard appears under its final name only once it is complete (written to a
temporary name, then renamed).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MANIFEST_NAME = "manifest.json"


def encode_png(image: np.ndarray) -> bytes:
    """HWC or HW uint8 array -> PNG bytes (deterministic: no timestamp chunk)."""
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}")
    mode = "L" if image.ndim == 2 or image.shape[-1] == 1 else "RGB"
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.ndim == 3 and mode == "L" else image, mode).save(
        buffer, format="PNG", compress_level=6
    )
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class SplitWriter:
    """Writes one split (``train``, ``heldout``...) as ``<split>-000000.tar``, ``-000001``..."""

    out_dir: Path
    split: str
    samples_per_shard: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    _tar: tarfile.TarFile | None = None
    _count: int = 0

    def _open_next(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
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
            {"name": self._name, "samples": self._count, "bytes": final.stat().st_size, "sha256": _sha256(final)}
        )
        self._tar = None

    def write(self, key: str, image: np.ndarray, meta: dict[str, Any]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits on them)")
        if self._tar is None:
            self._open_next()
        _add_member(self._tar, f"{key}.png", encode_png(image))
        _add_member(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self._count += 1
        if self._count == self.samples_per_shard:
            self._close_current()

    def close(self) -> dict[str, Any]:
        self._close_current()
        n = len(self.shards)
        return {
            "pattern": f"{self.split}-{{{0:06d}..{max(n - 1, 0):06d}}}.tar",
            "samples": sum(s["samples"] for s in self.shards),
            "shards": self.shards,
        }


def write_dataset(
    out_dir: str | Path,
    splits: dict[str, Iterable[tuple[str, np.ndarray, dict[str, Any]]]],
    samples_per_shard: int,
    info: dict[str, Any],
) -> dict[str, Any]:
    """Write each split's ``(key, image, meta)`` samples to shards; the manifest goes last, so
    its presence means the dataset is complete. Returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"format": "webdataset-tar", **info, "splits": {}}
    for split, samples in splits.items():
        writer = SplitWriter(out, split, samples_per_shard)
        for key, image, meta in samples:
            writer.write(key, image, meta)
        manifest["splits"][split] = writer.close()
    tmp = out / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / MANIFEST_NAME)
    return manifest


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.exists() else None


def split_urls(out_dir: str | Path, manifest: dict[str, Any], split: str) -> str:
    """The brace-pattern URL of one split of a written dataset."""
    if split not in manifest["splits"]:
        raise KeyError(f"no split '{split}' in {out_dir}; it has {', '.join(manifest['splits'])}")
    return str(Path(out_dir) / manifest["splits"][split]["pattern"])
