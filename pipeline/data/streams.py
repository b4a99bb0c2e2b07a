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

import gzip
import http.client
import io
import json
import logging
import os
import subprocess
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

    @classmethod
    def from_config(cls, data) -> "StreamOptions":
        """From a ``DataConfig``: the one place its stream knobs are read."""
        return cls(allow_pipe=data.allow_pipe, retries=data.http_retries, timeout=data.http_timeout)


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
    retries: int = 0
    read: int = 0
    failures: list[str] = field(default_factory=list)


class TarFormatError(OSError):
    """Bytes that are not a tar archive (or stop in the middle of one)."""


_END_BLOCK = bytes(512)
_FILE_TYPES = (b"0", b"\0", b"7")


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise TarFormatError(f"unexpected end of data ({len(data)} of {n} bytes)")
    return data


def _skip(stream: IO[bytes], n: int, seekable: bool) -> None:
    if seekable:
        stream.seek(n, io.SEEK_CUR)
        return
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise TarFormatError("unexpected end of data while skipping a member")
        n -= len(chunk)


def _octal(field: bytes) -> int:
    try:
        return int(field.strip(b" \0") or b"0", 8)
    except ValueError:
        if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
            return int.from_bytes(field[1:], "big")
        raise


def _records(
    stream: IO[bytes], seekable: bool, wanted: Callable[[int], bool], extensions: tuple[str, ...] | None = None
) -> Iterator[SampleRecord]:
    """The samples of a tar stream: consecutive members sharing a key, in order; the member
    bytes are read only for samples whose index is ``wanted`` (others are seeked past), and
    only for members whose extension is in ``extensions`` (all when None).

    Python's tarfile costs about as much per member as decoding a small PNG; this reads the
    512-byte headers directly (ustar, with GNU long names and pax ``path`` records).
    """
    long_name = None
    key, index, members = None, -1, None
    while True:
        header = stream.read(512)
        if not header or header == _END_BLOCK:
            break
        if len(header) < 512:
            raise TarFormatError("unexpected end of data in a header")
        if _octal(header[148:156]) != sum(header) - sum(header[148:156]) + 256:  # checksum field counts as spaces
            raise TarFormatError("bad header checksum (not a tar file, or corrupt)")
        size, kind = _octal(header[124:136]), header[156:157]
        padded = (size + 511) & ~511
        if kind in (b"L", b"x"):
            payload = _read_exact(stream, padded)[:size]
            if kind == b"L":
                long_name = payload.rstrip(b"\0").decode()
            else:
                for record in payload.decode().splitlines():
                    field, _, value = record.partition(" ")[2].partition("=")
                    if field == "path":
                        long_name = value
            continue
        name, long_name = long_name, None
        if name is None:
            name = header[:100].rstrip(b"\0").decode()
            prefix = header[345:500].rstrip(b"\0")
            if prefix and header[257:262] == b"ustar":
                name = f"{prefix.decode()}/{name}"
        if kind not in _FILE_TYPES:
            _skip(stream, padded, seekable)
            continue
        member_key, ext = split_key(name)
        if member_key != key:
            if key is not None:
                yield SampleRecord(index, key, members)
            key, index = member_key, index + 1
            members = {} if wanted(index) else None
        if members is not None and (extensions is None or ext in extensions):
            members[ext] = _read_exact(stream, padded)[:size] if padded else b""
        else:
            _skip(stream, padded, seekable)
    if key is not None:
        yield SampleRecord(index, key, members)


class ShortShard(OSError):
    """A shard stream ended cleanly but early: a tar cut at a header boundary looks complete."""


def read_shard(
    url: str,
    wanted: Callable[[int], bool],
    options: StreamOptions,
    stats: ShardStats,
    expected: int | None = None,
    extensions: tuple[str, ...] | None = None,
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
            with stream:
                seekable = not is_remote(url)
                if url.endswith((".tar.gz", ".tgz")):
                    stream, seekable = gzip.GzipFile(fileobj=stream), False
                for record in _records(stream, seekable, lambda i: i >= done and wanted(i), extensions):
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
        except (OSError, http.client.HTTPException, EOFError, ValueError, UnicodeDecodeError) as err:
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


def prefetch(url: str) -> None:
    """Ask the kernel to start reading a local shard into the page cache now, so that its
    disk reads overlap with decoding the current shard (no memory of ours is used)."""
    path = local_path(url)
    if path is None or not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # a missing shard is reported when it is read
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def local_path(url: str) -> Path | None:
    if url.startswith("file://"):
        return Path(urllib.parse.urlparse(url).path)
    return None if is_remote(url) else Path(url)
