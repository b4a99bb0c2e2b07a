"""Shards checked against their manifest: the sha256 the shard writer and the indexer record.

Two uses:

* at the start of training, with ``data.verify_checksums=true``: the sha256 of every local shard
  that a manifest lists with one (``verify_checksums``); a mismatch is a DataError naming the
  shard and both digests. Remote shards and shards without a manifest entry are not hashed
  (a remote shard would be downloaded once more only to be hashed);
* ``pipeline-shards verify <manifest.json or its folder>``: every shard of every split, local or
  remote, read whole: its sha256, its count of samples with an image and its images' size and
  channels against what the manifest records; one line per bad shard and a summary, exit 1 when
  any is bad.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import sys
import time
from pathlib import PurePosixPath
from typing import Any

import webdataset as wds

from pipeline.data.shards import MANIFEST_NAME, file_sha256
from pipeline.data.streams import DataError, StreamOptions, local_path, read_json
from pipeline.data.urls import shard_url

log = logging.getLogger(__name__)


def listed_shards(spec: str | list[str], options: StreamOptions) -> list[tuple[str, dict[str, Any]]]:
    """``(url, manifest entry)`` of the shards ``spec`` (as ``data.train_urls`` takes it) reads
    that a manifest lists: the split a ``manifest.json#split`` names, or, for a pattern, the
    entries of the ``manifest.json`` beside its shards."""
    found: dict[str, dict[str, Any]] = {}
    for item in [spec] if isinstance(spec, str) else spec:
        url, _, split = item.partition("#")
        if PurePosixPath(url).name == MANIFEST_NAME:
            try:
                splits = read_json(url, options).get("splits", {})
            except (OSError, ValueError):
                continue  # the loader names a missing or unreadable manifest
            base = url.rpartition("/")[0] + "/" if "/" in url else ""
            for name in [split] if split else list(splits):  # no split named: all of them
                for entry in splits.get(name, {}).get("shards", []):
                    found[shard_url(base, entry["name"])] = entry
            continue
        wanted = {u for u in wds.shardlists.expand_urls(item) if not u.startswith("pipe:")}
        for base in sorted({u.rpartition("/")[0] + "/" if "/" in u else "" for u in wanted}):
            try:
                manifest = read_json(base + MANIFEST_NAME, options)
            except (OSError, ValueError):
                continue  # no manifest: nothing to check against
            for entry in (e for s in manifest.get("splits", {}).values() for e in s.get("shards", [])):
                if shard_url(base, entry["name"]) in wanted:
                    found[shard_url(base, entry["name"])] = entry
    return list(found.items())


def verify_checksums(specs: list[str | list[str]], options: StreamOptions, workers: int = 4) -> int:
    """Hash the local shards of ``specs`` that their manifest lists with a sha256 (in threads:
    hashlib releases the GIL); DataError naming each mismatch. Returns how many were checked."""
    shards = {url: entry for spec in specs for url, entry in listed_shards(spec, options)}
    checked = {url: entry["sha256"] for url, entry in shards.items() if entry.get("sha256") and local_path(url)}
    if len(checked) < len(shards) or not shards:
        log.warning("data.verify_checksums: %d of %d shards have no sha256 in a manifest or are not local files; "
                    "they are not verified", len(shards) - len(checked), len(shards))  # fmt: skip
    started = time.perf_counter()

    def actual(url: str) -> str:
        try:
            return file_sha256(local_path(url))
        except OSError as err:
            return f"unreadable ({err.strerror or err})"

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        digests = dict(zip(checked, pool.map(actual, checked)))
    bad = [f"{url}: expected sha256 {checked[url]}, got {digest}" for url, digest in digests.items() if digest != checked[url]]
    if bad:
        raise DataError(f"{len(bad)} of {len(checked)} shards do not match the sha256 of their manifest (changed or "
                        f"damaged since it was written): {'; '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}")  # fmt: skip
    log.info("verified the sha256 of %d shards in %.1f s", len(checked), time.perf_counter() - started)
    return len(checked)


# --- pipeline-shards verify ------------------------------------------------------------------


def shard_problems(entry: dict[str, Any], scan, manifest: dict[str, Any]) -> list[str]:
    """What is wrong with one scanned shard (``indexer.ShardScan``) against its manifest entry."""
    if scan.error is not None:
        return [f"unreadable: {scan.error}"]
    problems = []
    if entry.get("sha256") and scan.sha256 != entry["sha256"]:
        problems.append(f"sha256 {scan.sha256}, the manifest says {entry['sha256']}")
    if scan.samples != entry.get("samples"):
        problems.append(f"{scan.samples} samples with an image, the manifest says {entry.get('samples')}")
    undecodable = [check for check in scan.images if check.error is not None]
    if undecodable:
        problems.append(f"{len(undecodable)} undecodable image(s), e.g. {undecodable[0].key}: {undecodable[0].error}")
    size, channels = manifest.get("image_size"), manifest.get("channels")
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        other = sorted({"x".join(map(str, c.shape[:2])) for c in scan.images if c.shape and c.shape[:2] != (height, width)})
        if other:
            problems.append(f"images of {', '.join(other[:3])}, the manifest says {height}x{width}")
    if channels == 1 and any(c.shape and len(c.shape) == 3 for c in scan.images):
        problems.append("colour images, the manifest says 1 channel (grayscale)")
    return problems


def verify_manifest(path: str, options: StreamOptions, workers: int = 8, sample_images: int | None = None,
                    out=sys.stdout) -> int:  # fmt: skip
    """Check every shard of the manifest at ``path`` (a file, a folder or a URL); prints one line
    per bad shard and a summary. Returns the number of bad shards."""
    from pipeline.data.indexer import scan_shard

    url = path if path.endswith(".json") else f"{path.rstrip('/')}/{MANIFEST_NAME}"
    manifest = read_json(url, options)
    base = url.rpartition("/")[0] + "/" if "/" in url else ""
    shards = [(split, shard_url(base, e["name"]), e) for split, s in manifest.get("splits", {}).items() for e in s["shards"]]
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        scans = pool.map(lambda s: scan_shard(s[1], options, sample_images), shards)
        bad = 0
        for (split, shard, entry), scan in zip(shards, scans):
            problems = shard_problems(entry, scan, manifest)
            if problems:
                bad += 1
                print(f"BAD {split} {shard}: {'; '.join(problems)}", file=out)
    checked = "every image decoded" if sample_images is None else f"{sample_images} image(s) decoded per shard"
    print(f"{len(shards) - bad} of {len(shards)} shards match {url} (sha256, sample count, image size; {checked}); "
          f"{bad} bad", file=out)  # fmt: skip
    return bad


def build_parser() -> argparse.ArgumentParser:
    from pipeline.data.indexer import sample_count

    parser = argparse.ArgumentParser(
        prog="pipeline-shards verify",
        description="Check every shard of a manifest: its sha256, its count of samples with an image, and its images' "
        "size and channels against what the manifest records. Exits 1 when any shard is bad.",
    )
    parser.add_argument("manifest", help="manifest.json (a path or http(s) URL) or the folder that holds it")
    parser.add_argument("--workers", type=int, default=8, metavar="N", help="shards read at once (threads)")
    parser.add_argument("--sample-images", type=sample_count, default=None, metavar="K",
                        help="images decoded per shard for the size check (default: all)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="pipeline-shards: %(message)s", stream=sys.stderr)
    try:
        bad = verify_manifest(args.manifest, StreamOptions(), args.workers, args.sample_images)
    except (DataError, OSError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
