"""From what the user wrote to a list of shards with their sample counts.

Accepted forms (``data.train_urls`` / ``data.eval_urls``), for local paths, ``http(s)://`` and
``pipe:`` alike:

* a brace pattern: ``/data/train-{000000..000099}.tar`` (several joined by ``::``);
* a list of such strings;
* a manifest: ``/data/manifest.json#train`` (the split after ``#``; without it, the split the
  caller asks for, or the only one there is).

Counts come from the manifest; for a pattern, from ``manifest.json`` beside the shards when
there is one.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.parse
from pathlib import PurePosixPath

import webdataset as wds

from pipeline.data.plan import Shard
from pipeline.data.streams import DataError, StreamOptions, is_remote, local_path, read_json

log = logging.getLogger(__name__)


def _base(url: str) -> str:
    head, sep, _ = url.rpartition("/")
    return head + sep


def shard_url(base: str, name: str) -> str:
    """A manifest's shard name -> its URL. A name is relative to the manifest's folder
    (``base``), as the shard writer writes them, unless it is absolute: a path from ``/`` or a
    URL (what ``pipeline-shards index`` writes for shards outside that folder)."""
    if name.startswith(("/", "pipe:")) or "://" in name:
        return name
    if base.startswith(("http://", "https://")):
        return urllib.parse.urljoin(base, name)  # (a name like ../x.tar: the server does not resolve it)
    return base + name


def _load_manifest(url: str, options: StreamOptions, required: bool) -> dict | None:
    try:
        return read_json(url, options)
    except (OSError, urllib.error.URLError, ValueError) as err:
        if required and isinstance(err, FileNotFoundError):
            raise DataError(f"manifest {url} does not exist: check the path in data.train_urls / data.eval_urls") from None
        if required:
            raise DataError(f"cannot read manifest {url}: {err}") from None
        return None


def shards_from_manifest(spec: str, options: StreamOptions, default_split: str) -> list[Shard]:
    url, _, split = spec.partition("#")
    manifest = _load_manifest(url, options, required=True)
    splits = manifest.get("splits", {})
    if not split:
        split = default_split if default_split in splits else (next(iter(splits)) if len(splits) == 1 else "")
    if split not in splits:
        raise DataError(f"{url} has no split '{split or default_split}'; it has: {', '.join(splits)} (select one with #name)")
    base = _base(url)
    return [Shard(shard_url(base, s["name"]), s["samples"]) for s in splits[split]["shards"]]


def _counts_beside(urls: list[str], options: StreamOptions) -> dict[str, int]:
    """Sample counts of shards named in a manifest.json next to them, if any."""
    counts: dict[str, int] = {}
    for base in sorted({_base(u) for u in urls if not u.startswith("pipe:")}):
        manifest = _load_manifest(base + "manifest.json", options, required=False)
        for split in (manifest or {}).get("splits", {}).values():
            for shard in split["shards"]:
                counts[shard_url(base, shard["name"])] = shard["samples"]
    return counts


def _check_some_exist(item: str, urls: list[str]) -> None:
    """A local path or pattern that matches no file is a mistake (a typo, an unmounted disk): say
    so, instead of a later "needs the sample count" (epoch mode) or endless empty draws. Single
    missing shards among existing ones are the loader's to count and skip."""
    paths = [local_path(u) for u in urls]
    if paths and None not in paths and not any(p.exists() for p in paths):
        shown = f"{item!r}" if len(urls) == 1 else f"{item!r} (none of its {len(urls)} paths, e.g. {urls[0]})"
        raise DataError(f"no such shard file: {shown} does not exist; check data.train_urls / data.eval_urls")


def resolve_shards(spec: str | list[str], options: StreamOptions, default_split: str = "train") -> list[Shard]:
    specs = [spec] if isinstance(spec, str) else list(spec)
    shards: list[Shard] = []
    patterns: list[str] = []
    for item in specs:
        if PurePosixPath(item.partition("#")[0]).name == "manifest.json":
            shards += shards_from_manifest(item, options, default_split)
        else:
            expanded = wds.shardlists.expand_urls(item)
            _check_some_exist(item, expanded)
            patterns += expanded
    if patterns:
        counts = _counts_beside(patterns, options)
        shards += [Shard(u, counts.get(u)) for u in patterns]
    if not shards:
        raise DataError(f"no shards in {spec!r}")
    if any(u.url.startswith("pipe:") for u in shards) and not options.allow_pipe:
        raise DataError("pipe: URLs run shell commands; set data.allow_pipe=true to allow them")
    remote = sum(is_remote(s.url) for s in shards)
    log.debug("%d shards (%d remote), %d with known counts", len(shards), remote, sum(s.samples is not None for s in shards))
    return shards
