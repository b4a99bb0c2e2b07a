"""Opening shard URLs and reading their samples, with retries and honest accounting.

Written here rather than with ``webdataset.tarfile_to_samples`` because we need three things
its handlers do not give: the shard URL *and* sample key of every failure (for the warning and
the counts), a retry that re-opens a dropped HTTP stream and skips the samples already read,
and reading a sample's bytes only when the epoch plan needs it (resume skips without decoding;
local shards are read with seeks, so skipped samples cost a header read).

URLs: a local path, ``file://``, ``http(s)://`` (urllib: no curl needed on the node), or
``pipe:<shell command>`` whose stdout is the tar (refused unless explicitly allowed: it runs a
shell command taken from a config file).
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import subprocess
import tarfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """Data that cannot be read the way the config asks (as opposed to a skipped sample)."""


@dataclass
class StreamOptions:
    allow_pipe: bool = False
    retries: int = 3  # re-opens of a remote shard after an HTTP error or a dropped connection
    timeout: float = 30.0  # seconds without data before an HTTP read fails
    backoff: float = 0.5  # seconds before the first retry, doubled each time


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "pipe:"))


class _PipeStream(io.RawIOBase):
    """stdout of a shell command; a non-zero exit status is an error at end of stream."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.process.stdout.readinto(buffer)
        if n == 0:
            status = self.process.wait()
            if status != 0:
                raise OSError(f"pipe command exited with status {status}: {self.process.stderr.read().decode()[-300:]}")
        return n

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        super().close()


def open_url(url: str, options: StreamOptions) -> IO[bytes]:
    """A readable binary stream of the URL's bytes."""
    if url.startswith("pipe:"):
        if not options.allow_pipe:
            raise DataError(f"refusing to run '{url}': pipe: URLs run shell commands; set data.allow_pipe=true to allow them")
        return io.BufferedReader(_PipeStream(url[len("pipe:"):]), buffer_size=1 << 20)
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=options.timeout)
    path = urllib.parse.urlparse(url).path if url.startswith("file://") else url
    return open(path, "rb")


def read_text(url: str, options: StreamOptions) -> str:
    with open_url(url, options) as stream:
        return stream.read().decode()


def read_json(url: str, options: StreamOptions) -> dict:
    return json.loads(read_text(url, options))


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's convention: ``dir/abc.seg.png`` -> key ``dir/abc``, extension ``seg.png``."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


@dataclass
class SampleRecord:
    index: int  # position of the sample within its shard
    key: str
    members: dict[str, bytes] | None  # None: not needed, bytes not read


@dataclass
class ShardStats:
    opened: int = 0
    retries: int = 0
    read: int = 0
    failures: list[str] = field(default_factory=list)


def _records(tar: tarfile.TarFile, wanted: Callable[[int], bool]) -> Iterator[SampleRecord]:
    """Group consecutive tar members by key into samples; read bytes of wanted samples only."""
    current_key, members, index = None, {}, -1
    for member in tar:
        if not member.isfile():
            continue
        key, ext = split_key(member.name)
        if key != current_key:
            if current_key is not None:
                yield SampleRecord(index, current_key, members if wanted(index) else None)
            current_key, members, index = key, {}, index + 1
        if wanted(index):
            members[ext] = tar.extractfile(member).read()
    if current_key is not None:
        yield SampleRecord(index, current_key, members if wanted(index) else None)


class ShortShard(OSError):
    """A shard stream ended cleanly but early: a tar cut at a header boundary looks complete."""


def read_shard(
    url: str, wanted: Callable[[int], bool], options: StreamOptions, stats: ShardStats, expected: int | None = None
) -> Iterator[SampleRecord]:
    """The samples of one shard in order. A remote shard that fails (HTTP error, dropped
    connection, non-zero pipe exit, fewer than the ``expected`` samples) is re-opened up to
    ``options.retries`` times, skipping the samples already given; what still cannot be read
    ends the shard early, with a warning."""
    done = 0  # samples of this shard already yielded
    attempt = 0
    while True:
        last_key = None
        try:
            stream = open_url(url, options)
            stats.opened += 1
            with stream:
                # Local files are seekable: "r:" skips unread member data with seeks.
                mode = "r|*" if is_remote(url) else "r:*"
                with tarfile.open(fileobj=stream, mode=mode) as tar:
                    for record in _records(tar, lambda i: i >= done and wanted(i)):
                        last_key = record.key
                        if record.index >= done:
                            done = record.index + 1
                            stats.read += 1
                            yield record
            if expected is not None and done < expected:
                raise ShortShard(f"the stream ended after {done} of {expected} samples")
            return
        except DataError:
            raise
        except (OSError, tarfile.TarError, http.client.HTTPException, EOFError, ValueError) as err:
            where = f"after sample '{last_key}'" if last_key else "before its first sample"
            if is_remote(url) and attempt < options.retries:
                attempt += 1
                stats.retries += 1
                log.warning("shard %s failed %s (%s); retry %d of %d", url, where, err, attempt, options.retries)
                time.sleep(options.backoff * 2 ** (attempt - 1))
                continue
            log.warning("skipping the rest of shard %s: failed %s: %s", url, where, err)
            stats.failures.append(f"{url}: {err}")
            return


def manifest_url_for(shard_url: str) -> str:
    """Where a shard's manifest would sit: ``manifest.json`` in the same directory."""
    head, _, _ = shard_url.rpartition("/")
    return f"{head}/manifest.json" if head else "manifest.json"


def local_path(url: str) -> Path | None:
    if url.startswith("file://"):
        return Path(urllib.parse.urlparse(url).path)
    return None if is_remote(url) else Path(url)
