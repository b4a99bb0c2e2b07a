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
import math
import os
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from webdataset.tariterators import base_plus_ext

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


# The image members the loader decodes (extensions as ``split_key`` gives them, lower case). A
# sample is one tar sample that has at least one of them; samples without any are not counted.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")

# Metadata members that webdataset's ``tar_file_iterator`` passes over (its ``skip_meta``
# default, and top-level ``__...__`` names).
_WEBDATASET_META = re.compile(r"__[^/]*__($|/)")


def split_key(name: str) -> tuple[str, str] | None:
    """A member name -> (sample key, lower-case extension) by webdataset's own rule, so that our
    samples are the ones ``webdataset.WebDataset`` yields: the key is the path up to the first
    dot of the file name (``./a.b/c.seg.png`` -> ``./a.b/c``, ``seg.png``).

    None for a member webdataset passes over without ending the sample: a name that
    ``base_plus_ext`` does not split (no dot in the file name, e.g. ``README``) and metadata
    (``__...__``). The plain case is split here (1 us less per member than webdataset's regex,
    with the same result); anything else is left to webdataset's function itself."""
    directory, slash, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if stem and dot and not name.startswith("__"):
        return directory + slash + stem, ext.lower()
    if ("/" not in name and name.startswith("__") and name.endswith("__")) or _WEBDATASET_META.match(name):
        return None
    key, ext = base_plus_ext(name)  # odd names: a file name that starts with a dot, say
    return None if key is None else (key, ext.lower())


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
    """A numeric header field, read as Python's tarfile reads it: octal text up to the first
    NUL, spaces around it allowed; or GNU base-256 (sizes of 8 GiB and more)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _header(header: bytes) -> tuple[str, int, bytes]:
    """A 512-byte tar header -> (name, data size, type flag); the checksum is not checked here."""
    size, kind = _octal(header[124:136]), header[156:157]
    name = header[:100].rstrip(b"\0").decode()
    prefix = header[345:500].rstrip(b"\0")
    if prefix and header[257:262] == b"ustar":
        name = f"{prefix.decode()}/{name}"
    return name, size, kind


def _checksum_ok(header: bytes) -> bool:
    return _octal(header[148:156]) == sum(header) - sum(header[148:156]) + 256  # the field counts as spaces


def _long_name(kind: bytes, payload: bytes) -> str | None:
    """The name a GNU long-name (``L``) or pax (``x``) record gives the next member."""
    if kind == b"L":
        return payload.rstrip(b"\0").decode()
    for record in payload.decode().splitlines():
        field, _, value = record.partition(" ")[2].partition("=")
        if field == "path":
            return value
    return None


class TarMembers:
    """The file members of a tar stream, in order, as ``(key, extension, size)`` by webdataset's
    naming (``split_key``; members it passes over are left out). Call ``read()`` for the bytes
    of the member just given; those not read are seeked (or read) past.

    Python's tarfile costs about as much per member as decoding a small PNG; this reads the
    512-byte headers directly (ustar, with GNU long names and pax ``path`` records)."""

    def __init__(self, stream: IO[bytes], seekable: bool) -> None:
        self.stream, self.seekable = stream, seekable
        self._size, self._left = 0, 0  # the current member's size, and its padded bytes not read

    def read(self) -> bytes:
        data = _read_exact(self.stream, self._left)[: self._size] if self._left else b""
        self._left = 0
        return data

    def __iter__(self) -> Iterator[tuple[str, str, int]]:
        stream, long_name = self.stream, None
        while True:
            header = stream.read(512)
            if not header or header == _END_BLOCK:
                return
            if len(header) < 512:
                raise TarFormatError("unexpected end of data in a header")
            if not _checksum_ok(header):
                raise TarFormatError("bad header checksum (not a tar file, or corrupt)")
            name, size, kind = _header(header)
            padded = (size + 511) & ~511
            if kind in (b"L", b"x"):
                long_name = _long_name(kind, _read_exact(stream, padded)[:size])
                continue
            name, long_name = long_name or name, None
            split = split_key(name) if kind in _FILE_TYPES else None
            if split is not None:
                self._size, self._left = size, padded
                yield split[0], split[1], size
                padded, self._left = self._left, 0
            _skip(stream, padded, self.seekable)


def _records(
    stream: IO[bytes],
    seekable: bool,
    wanted: Callable[[int], bool],
    extensions: tuple[str, ...] | None = None,
    only_with_extensions: bool = False,
) -> Iterator[SampleRecord]:
    """The samples of a tar stream: consecutive members sharing a key, in order; the member
    bytes are read only for samples whose index is ``wanted`` (others are seeked past), and
    only for members whose extension is in ``extensions`` (all when None).

    With ``only_with_extensions``, a sample none of whose members has one of ``extensions`` is
    passed over and not numbered: indices then count the samples with an image, as the
    manifest does. (Members before a sample's first image are never read, so whether it is
    wanted is decided there.)"""
    members_of = TarMembers(stream, seekable)
    key, index, members, numbered = None, -1, None, False
    for member_key, ext, _ in members_of:
        if member_key != key:
            if numbered:
                yield SampleRecord(index, key, members)
            key, members, numbered = member_key, None, False
        selected = extensions is None or ext in extensions
        if not numbered and (selected or not only_with_extensions):
            index, numbered = index + 1, True
            members = {} if wanted(index) else None
        if members is not None and selected:
            members[ext] = members_of.read()
    if numbered:
        yield SampleRecord(index, key, members)


@dataclass
class TarIndex:
    """Where each sample's first wanted member lies in a tar held in memory (an mmap of a local
    shard): what random access by sample position needs, without copying anything."""

    keys: list[str]
    extensions: list[str | None]  # None: the sample has no wanted member
    offsets: list[int]
    sizes: list[int]
    error: str | None = None  # why the index stops early (truncated or corrupt tar), if it does


def index_tar(data, extensions: tuple[str, ...]) -> TarIndex:
    """Index a tar held in ``data`` (bytes or mmap): where each sample's image lies.

    A clean shard (what shard writers make) is indexed with numpy in a few array passes;
    anything unusual (long names, other member types, a truncated or corrupt archive) takes a
    header-by-header walk with the same result. A tar that stops or turns corrupt keeps the
    samples before the fault, like the streaming reader."""
    fast = _index_clean(data, extensions)
    if fast is not None:
        return fast
    index, headers = _walk(data, extensions, len(data))
    bad = _first_bad_checksum(data, headers)
    if bad is not None:
        index, _ = _walk(data, extensions, bad)
        index.error = f"bad header checksum at byte {bad} (not a tar file, or corrupt)"
    if index.error and index.keys:  # the sample being read when it failed may lack members
        for column in (index.keys, index.extensions, index.offsets, index.sizes):
            column.pop()
    return index


def _octal_columns(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Numeric header fields (one per row) -> (values, valid). Valid rows hold what ``_octal``
    reads without doubt: one run of octal digits up to the first NUL, with only spaces around
    it. Other rows (odd but maybe legal text, base-256) are left to ``_octal``."""
    # What tar writers write (tarfile, GNU tar: every row the same number of digits, then a
    # NUL) takes one pass; the general rule below costs 10x more (cumulative sums along rows).
    width = int(np.argmin(fields[0] != 0)) if len(fields) and (fields[0] == 0).any() else 0
    digits = fields[:, :width]
    if width and (fields[:, width] == 0).all() and ((digits >= ord("0")) & (digits <= ord("7"))).all():
        powers = np.left_shift(1, 3 * np.arange(width - 1, -1, -1, dtype=np.int64))
        return (digits - ord("0")).astype(np.int64) @ powers, np.ones(len(fields), dtype=bool)
    before_nul = np.cumsum(fields == 0, axis=1) == 0
    digit = (fields >= ord("0")) & (fields <= ord("7")) & before_nul
    other = before_nul & ~digit & (fields != ord(" "))
    runs = (digit[:, 1:] & ~digit[:, :-1]).sum(axis=1) + digit[:, 0]
    valid = ~other.any(axis=1) & (runs <= 1)
    place = np.cumsum(digit[:, ::-1], axis=1)[:, ::-1] - digit
    values = np.where(digit, (fields.astype(np.int64) - ord("0")) << (3 * place), 0).sum(axis=1)
    return values, valid


def _blocks(data) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8, count=(len(data) // 512) * 512).reshape(-1, 512)


def _header_checksums_ok(blocks: np.ndarray) -> np.ndarray:
    """Per 512-byte block: does it carry a plainly written checksum that matches its bytes?"""
    # uint32 sums are exact (at most 512 x 255) and 2.5x faster than int64 ones.
    computed = blocks.sum(axis=1, dtype=np.uint32) - blocks[:, 148:156].sum(axis=1, dtype=np.uint32) + 256
    stored, valid = _octal_columns(blocks[:, 148:156])
    return valid & (stored == computed)


def _index_clean(data, extensions: tuple[str, ...]) -> TarIndex | None:
    """The index of a clean ustar archive (plain files, names under 100 bytes, nothing cut
    short) computed with array operations only; None for anything else.

    Headers are found by their "ustar" magic and checksum, then proven to be the archive's
    chain: the first is block 0, each one's size leads exactly to the next, the last to the
    end-of-archive zeros. A walk in Python costs about 2 us per member: as much as a fifth
    of decoding a 28x28 PNG."""
    if len(data) % 512 or not len(data):
        return None
    blocks = _blocks(data)
    candidates = np.flatnonzero((blocks[:, 257] == ord("u")) & (blocks[:, 258] == ord("s")) & (blocks[:, 259] == ord("t")))
    headers = blocks[candidates]
    if not len(candidates) or not _header_checksums_ok(headers).all():
        return None
    sizes, plain = _octal_columns(headers[:, 124:136])
    if not plain.all():
        return None
    after = candidates + 1 + ((sizes + 511) >> 9)  # where the next header must be
    end = int(after[-1])
    if candidates[0] != 0 or (after[:-1] != candidates[1:]).any() or end > len(blocks) or blocks[end:].any():
        return None  # not one chain from block 0 to zero blocks: the walk decides
    kind = headers[:, 156]
    if not ((kind == ord("0")) | (kind == 0)).all() or headers[:, 345].any() or headers[:, 99].any():
        return None  # other member types, ustar prefixes or 100-byte names: the walk handles them
    # Names -> key (up to the first dot after the last slash) and extension, as byte arrays.
    width = int(np.flatnonzero(headers[:, :100].any(axis=0)).max(initial=0)) + 1  # the longest name
    names = headers[:, :width]
    split = _split_names(names)
    if split is None:
        return None  # names webdataset splits its own odd way: the walk asks ``split_key``
    keys, exts = split
    new_sample = np.ones(len(keys), dtype=bool)
    new_sample[1:] = keys[1:] != keys[:-1]
    sample = np.cumsum(new_sample) - 1
    wanted = np.zeros(len(exts), dtype=bool)
    for extension in extensions:
        wanted |= exts == extension.encode()
    sample_of_wanted = sample[wanted]
    if (np.diff(sample_of_wanted) > 0).all():  # at most one image per sample: no sort needed
        first, member = sample_of_wanted, np.flatnonzero(wanted)
    else:
        first, at = np.unique(sample_of_wanted, return_index=True)  # each sample's first wanted member
        member = np.flatnonzero(wanted)[at]
    count = int(sample[-1]) + 1
    offsets, lengths, kinds = np.zeros(count, np.int64), np.zeros(count, np.int64), np.zeros(count, exts.dtype)
    offsets[first], lengths[first], kinds[first] = (candidates[member] + 1) * 512, sizes[member], exts[member]
    try:
        return TarIndex(
            [k.decode() for k in keys[new_sample].tolist()],
            [k.decode() or None for k in kinds.tolist()],
            offsets.tolist(),
            lengths.tolist(),
        )
    except UnicodeDecodeError:
        return None  # a name that is not UTF-8: the walk reports it as the streaming reader does


def _split_names(names: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Member names (rows of bytes) -> keys and lower-case extensions, as bytes arrays: the key
    runs up to the first dot after the last slash, as in ``split_key``. None when a name is one
    that rule does not cover (no dot in its file name, a file name that starts with a dot, a
    ``__`` metadata name)."""
    if names.shape[1] < 2 or ((names[:, 0] == ord("_")) & (names[:, 1] == ord("_"))).any():
        return None
    dots = names[0] == ord(".")
    dot = int(np.argmax(dots)) if dots.any() else 0
    if 0 < dot < names.shape[1] - 1 and (names[:, dot] == ord(".")).all() and not (names[:, :dot] == ord(".")).any() \
            and not (names == ord("/")).any():  # fmt: skip
        # Every name has the same key length and no folder (what shard writers make): slices.
        keys, exts = names[:, :dot], names[:, dot + 1 :]
    else:
        split = _split_names_any(names)
        if split is None:
            return None
        keys, exts = split
    exts = exts + (32 * ((exts >= ord("A")) & (exts <= ord("Z")))).astype(np.uint8)  # lower case
    return tuple(np.ascontiguousarray(a).view(f"S{a.shape[1]}").ravel() for a in (keys, exts))


def _split_names_any(names: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    width = names.shape[1]
    column = np.arange(width, dtype=np.int16)
    last_slash = np.where(names == ord("/"), column, np.int16(-1)).max(axis=1)
    dots = (names == ord(".")) & (column > last_slash[:, None])
    if not dots.any(axis=1).all():
        return None
    dot = dots.argmax(axis=1).astype(np.int16)
    if (dot == last_slash + 1).any():
        return None
    keys = np.where(column < dot[:, None], names, 0)
    shifted = dot[:, None] + 1 + column  # the extension moved to the start of its row
    exts = np.where(shifted < width, np.take_along_axis(names, np.minimum(shifted, width - 1), axis=1), 0)
    return keys, exts


def _walk(data, extensions: tuple[str, ...], end: int) -> tuple[TarIndex, list[int]]:
    index, headers = TarIndex([], [], [], []), []
    long_name, position = None, 0
    try:
        while position + 512 <= end:
            header = data[position : position + 512]
            if header == _END_BLOCK:
                return index, headers
            name, size, kind = _header(header)
            headers.append(position)
            start, position = position + 512, position + 512 + ((size + 511) & ~511)
            if position > end:  # the member, or its padding to 512 bytes, is cut off
                raise TarFormatError(f"unexpected end of data ({max(0, end - start)} of {position - start} bytes)")
            if kind in (b"L", b"x"):
                long_name = _long_name(kind, data[start : start + size])
                continue
            name, long_name = long_name or name, None
            if kind not in _FILE_TYPES:
                continue
            split = split_key(name)
            if split is None:
                continue
            key, ext = split
            if not index.keys or index.keys[-1] != key:
                index.keys.append(key)
                index.extensions.append(None)
                index.offsets.append(0)
                index.sizes.append(0)
            if index.extensions[-1] is None and ext in extensions:
                index.extensions[-1], index.offsets[-1], index.sizes[-1] = ext, start, size
        if position < len(data):
            raise TarFormatError("unexpected end of data in a header")
    except (TarFormatError, ValueError, UnicodeDecodeError) as err:
        index.error = str(err)
    return index, headers


def _first_bad_checksum(data, headers: list[int]) -> int | None:
    """Offset of the first header whose checksum is wrong (or unreadable), if any."""
    if not headers:
        return None
    blocks = _blocks(data)[np.asarray(headers) // 512]
    for row in np.flatnonzero(~_header_checksums_ok(blocks)).tolist():
        try:  # a row the plain check doubts: the exact parse decides
            if not _checksum_ok(bytes(blocks[row])):
                return headers[row]
        except ValueError:
            return headers[row]
    return None


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
    ends the shard early, with a warning.

    With ``extensions``, only the samples that hold a member of one of them are samples (read,
    numbered and counted against ``expected``), as the manifest counts samples with an image."""
    only_images = extensions is not None
    done = 0  # samples of this shard already yielded
    attempt = 0
    while True:
        last_key = None
        try:
            stream = open_url(url, options)
            with stream:
                seekable = not is_remote(url)
                if is_gzipped(url):
                    stream, seekable = gzip.GzipFile(fileobj=stream), False
                records = _records(stream, seekable, lambda i: i >= done and wanted(i), extensions, only_images)
                for record in records:
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
            _warn_per_shard(url, "skipping the rest of shard %s: failed %s: %s", url, where, err)
            stats.failures.append(f"{url}: {err}")
            return


WARNING_INTERVAL_S = 60.0
_last_warned: dict[str, tuple[float, int]] = {}  # url -> (when last logged, repeats not logged since)


def _warn_per_shard(url: str, message: str, *args) -> None:
    """A shard's warning, at most once per WARNING_INTERVAL_S per shard and process: resampled mode
    draws the same broken shard again and again (at thousands of draws a second, a missing file
    filled the disk with this line). The repeats left out are counted in the next one logged."""
    now = time.monotonic()
    when, repeats = _last_warned.get(url, (-math.inf, 0))
    if now - when < WARNING_INTERVAL_S:
        _last_warned[url] = when, repeats + 1
        return
    _last_warned[url] = now, 0
    if repeats:
        message += f" (and {repeats} time(s) in the last {now - when:.0f} s, not logged)"
    log.warning(message, *args)


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


def is_gzipped(url: str) -> bool:
    return url.endswith((".tar.gz", ".tgz"))


def mappable_path(url: str) -> Path | None:
    """The path of a shard whose tar bytes lie on local disk as they are (not gzipped): one
    that can be memory-mapped and read at any offset."""
    return None if is_gzipped(url) else local_path(url)
