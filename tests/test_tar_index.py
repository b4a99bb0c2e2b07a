"""The in-memory tar index (``index_tar``: numpy fast path and header walk), the pixel decoder
(``decode_pixels``: pyspng for 8-bit PNGs already in the wanted mode, PIL otherwise) and the
windowed shuffle of the epoch plan.

Inputs are real files written with Python's ``tarfile`` and PIL; the references are the streaming
reader (``_records``), the fallback walk, ``tarfile``'s own member offsets and PIL's decoder.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import streams
from pipeline.data.loader import decode_pixels
from pipeline.data.plan import window_shuffle
from pipeline.data.streams import index_tar

EXTS = ("png", "jpg", "jpeg", "webp")
FORMATS = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT, "ustar": tarfile.USTAR_FORMAT}


# --- helpers ------------------------------------------------------------------------------------


def _payload(rng: np.random.Generator, size: int) -> bytes:
    return rng.integers(0, 256, size, dtype=np.uint8).tobytes()


def write_tar(path: Path, entries: list[tuple[str, bytes | None]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    """Write ``entries`` (name, bytes; bytes None: a directory) as a tar file; its bytes."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 0, 0o644
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def read_records(data: bytes, exts: tuple[str, ...] = EXTS):
    """What the streaming reader gives: keys, each sample's wanted members (in tar order), and
    the exception that stopped it (None when it ran to the end)."""
    keys, members, error = [], [], None
    try:
        for record in streams._records(io.BytesIO(data), True, lambda i: True, exts):
            keys.append(record.key)
            members.append(record.members)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        error = err
    return keys, members, error


def columns(index: streams.TarIndex):
    return index.keys, index.extensions, index.offsets, index.sizes


def check_against_records(data: bytes, index: streams.TarIndex, exts: tuple[str, ...] = EXTS) -> None:
    """Every indexed sample's bytes at data[offset:offset+size] are the streaming reader's
    first wanted member of that sample."""
    keys, members, _ = read_records(data, exts)
    assert index.keys == keys[: len(index.keys)]
    for i, key in enumerate(index.keys):
        wanted = members[i]
        if not wanted:
            assert index.extensions[i] is None, key
            continue
        ext, blob = next(iter(wanted.items()))
        assert index.extensions[i] == ext, key
        assert index.sizes[i] == len(blob), key
        assert bytes(data[index.offsets[i] : index.offsets[i] + index.sizes[i]]) == blob, key


# --- 1. index_tar on valid archives -------------------------------------------------------------

_rng = np.random.default_rng(1234)
_NESTED = io.BytesIO()
with tarfile.open(fileobj=_NESTED, mode="w", format=tarfile.USTAR_FORMAT) as _inner:
    _info = tarfile.TarInfo("inner.png")
    _info.size = 700
    _inner.addfile(_info, io.BytesIO(_payload(_rng, 700)))

LONG = "x" * 70 + "/" + "y" * 70  # 141 bytes of key: GNU long name, pax path, ustar prefix
NAME99 = "n" * 95  # + ".png": 99 bytes, the longest name the fast path takes
NAME100 = "m" * 96  # + ".png": exactly 100 bytes, no NUL in the name field

# name -> (entries, expected keys, expected extensions, fast path taken for formats)
CASES = {
    "plain": (
        [("k0.png", _payload(_rng, 300)), ("k1.png", _payload(_rng, 512)), ("k2.png", _payload(_rng, 513)),
         ("k3.png", _payload(_rng, 1500))],
        ["k0", "k1", "k2", "k3"], ["png"] * 4, {"gnu", "pax", "ustar"},
    ),
    "subdirectories": (
        [("a/b/k1.png", _payload(_rng, 200)), ("a/b/k1.json", b"{}"), ("a/c/k2.jpg", _payload(_rng, 900)),
         ("a/k3.webp", _payload(_rng, 100))],
        ["a/b/k1", "a/c/k2", "a/k3"], ["png", "jpg", "webp"], {"gnu", "pax", "ustar"},
    ),
    "dotted-directories": (
        [("dir.v2/k.seg.png", _payload(_rng, 300)), ("dir.v2/k.cls", b"3"), ("dir.v2/m.png", _payload(_rng, 10)),
         ("x.y.z/w.q.jpeg", _payload(_rng, 40))],
        ["dir.v2/k", "dir.v2/m", "x.y.z/w"], [None, "png", None], {"gnu", "pax", "ustar"},
    ),
    "extra-members": (
        [("k0.cls", b"1"), ("k0.png", _payload(_rng, 600)), ("k0.json", b'{"a": 1}'),
         ("k1.json", b"{}"), ("k1.jpeg", _payload(_rng, 100)), ("k1.cls", b"2"),
         ("k2.png", _payload(_rng, 50)), ("k2.jpg", _payload(_rng, 60)), ("k2.cls", b"3")],
        ["k0", "k1", "k2"], ["png", "jpeg", "png"], {"gnu", "pax", "ustar"},
    ),
    "sample-without-image": (
        [("k0.png", _payload(_rng, 100)), ("k1.json", b"{}"), ("k1.cls", b"1"), ("k2.png", _payload(_rng, 100))],
        ["k0", "k1", "k2"], ["png", None, "png"], {"gnu", "pax", "ustar"},
    ),
    "upper-case-extension": (
        [("K.PNG", _payload(_rng, 100)), ("k.Jpg", _payload(_rng, 100)), ("Q.cls", b"1"), ("Q.WebP", b"xx")],
        ["K", "k", "Q"], ["png", "jpg", "webp"], {"gnu", "pax", "ustar"},
    ),
    "long-name": (
        [("k0.png", _payload(_rng, 100)), (LONG + ".png", _payload(_rng, 333)), (LONG + ".cls", b"7"),
         ("k2.png", _payload(_rng, 100))],
        ["k0", LONG, "k2"], ["png", "png", "png"], set(),
    ),
    "name-of-99-bytes": (
        [(NAME99 + ".png", _payload(_rng, 100)), ("k.png", _payload(_rng, 10))],
        [NAME99, "k"], ["png", "png"], {"gnu", "pax", "ustar"},
    ),
    "name-of-100-bytes": (
        [(NAME100 + ".png", _payload(_rng, 100)), ("k.png", _payload(_rng, 10))],
        [NAME100, "k"], ["png", "png"], set(),
    ),
    "zero-byte-members": (
        [("k0.png", b""), ("k0.cls", b""), ("k1.png", _payload(_rng, 10)), ("k2.cls", b""), ("k2.png", b"")],
        ["k0", "k1", "k2"], ["png", "png", "png"], {"gnu", "pax", "ustar"},
    ),
    "directory-entries": (
        [("d", None), ("d/k0.png", _payload(_rng, 100)), ("d/k1.png", _payload(_rng, 100)), ("e", None),
         ("e/k2.png", _payload(_rng, 100))],
        ["d/k0", "d/k1", "e/k2"], ["png", "png", "png"], set(),
    ),
    "non-ascii-name": (  # utf-8 in the header for gnu/ustar, a pax path record for pax
        [("ü/k0.png", _payload(_rng, 100)), ("ü/k1.png", _payload(_rng, 100))],
        ["ü/k0", "ü/k1"], ["png", "png"], {"gnu", "ustar"},
    ),
    "members-webdataset-passes-over": (  # no dot in the file name, metadata, a file name starting with a dot
        [("d/k0.png", _payload(_rng, 100)), ("d/README", b"x"), ("d/k0.cls", b"1"), ("__meta__/m.json", b"{}"),
         ("__index__", b""), ("d/k1.png", _payload(_rng, 100)), ("f/.hidden.png", _payload(_rng, 10)),
         ("f/g.png", _payload(_rng, 10))],
        ["d/k0", "d/k1", "f/", "f/g"], ["png", "png", None, "png"], set(),
    ),
    "no-dot-in-a-file-name": (  # the numpy path leaves these to the walk
        [("d/k0.png", _payload(_rng, 100)), ("d/README", b"x"), ("d/k0.cls", b"1"), ("d/k1.png", _payload(_rng, 10))],
        ["d/k0", "d/k1"], ["png", "png"], set(),
    ),
    "file-name-starting-with-a-dot": (
        [("f/.hidden.png", _payload(_rng, 10)), ("f/g.png", _payload(_rng, 10))],
        ["f/", "f/g"], [None, "png"], set(),
    ),
    "nested-tar-member": (  # a member whose bytes hold valid tar headers: not part of the chain
        [("k0.tar", _NESTED.getvalue()), ("k0.png", _payload(_rng, 100)), ("k1.png", _payload(_rng, 100))],
        ["k0", "k1"], ["png", "png"], set(),
    ),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_index_matches_walk_records_and_tarfile(tmp_path, case, fmt):
    entries, keys, exts, fast_for = CASES[case]
    data = write_tar(tmp_path / "shard.tar", entries, FORMATS[fmt])

    index = index_tar(data, EXTS)
    assert index.error is None
    assert index.keys == keys
    assert index.extensions == exts

    walked, _ = streams._walk(data, EXTS, len(data))
    assert walked.error is None
    assert columns(index) == columns(walked)

    records_keys, _, records_error = read_records(data)
    assert records_error is None
    assert records_keys == keys
    check_against_records(data, index)

    # tarfile's own view of where each sample's first image member lies.
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        first = {}
        for member in tar.getmembers():
            if member.isfile() and streams.split_key(member.name) is not None:
                key, ext = streams.split_key(member.name)
                if ext in EXTS:
                    first.setdefault(key, (ext, member.offset_data, member.size))
    for i, key in enumerate(keys):
        if exts[i] is None:
            assert key not in first and index.sizes[i] == 0
        else:
            assert (index.extensions[i], index.offsets[i], index.sizes[i]) == first[key]

    fast = streams._index_clean(data, EXTS)
    if fmt in fast_for:
        assert fast is not None, "a clean archive of short names should take the numpy path"
        assert columns(fast) == columns(walked)
    else:
        assert fast is None


def test_extension_with_a_dot_is_indexed_when_wanted(tmp_path):
    entries = [("dir.v2/k.seg.png", b"S" * 300), ("dir.v2/k.png", b"P" * 20), ("dir.v2/m.png", b"M" * 10)]
    data = write_tar(tmp_path / "shard.tar", entries, tarfile.GNU_FORMAT)
    exts = ("seg.png", "png")
    index = index_tar(data, exts)
    assert streams._index_clean(data, exts) is not None
    assert columns(index) == columns(streams._walk(data, exts, len(data))[0])
    assert index.keys == ["dir.v2/k", "dir.v2/m"]
    assert index.extensions == ["seg.png", "png"]  # the first wanted member in tar order
    assert bytes(data[index.offsets[0] : index.offsets[0] + index.sizes[0]]) == b"S" * 300
    check_against_records(data, index, exts)


def test_shard_writer_layout_takes_the_fast_path(tmp_path):
    """What the shard writer makes (ustar, addfile with mtime 0): many samples, the numpy path."""
    rng = np.random.default_rng(7)
    entries = []
    for i in range(200):
        entries += [(f"{i:06d}.png", _payload(rng, int(rng.integers(0, 2000)))), (f"{i:06d}.cls", b"%d" % (i % 10))]
    data = write_tar(tmp_path / "shard.tar", entries)
    fast = streams._index_clean(data, EXTS)
    assert fast is not None
    assert columns(fast) == columns(streams._walk(data, EXTS, len(data))[0])
    assert fast.keys == [f"{i:06d}" for i in range(200)]
    check_against_records(data, fast)


# --- 2. faults ----------------------------------------------------------------------------------

SAMPLES = [f"s{i}" for i in range(5)]


@pytest.fixture
def faulty(tmp_path):
    """Five samples of three members each (cls, png, json); bytes and tarfile's members."""
    rng = np.random.default_rng(99)
    entries = []
    for key in SAMPLES:
        entries += [(f"{key}.cls", b"5"), (f"{key}.png", _payload(rng, int(rng.integers(600, 1500)))),
                    (f"{key}.json", b'{"k": 1}')]  # fmt: skip
    data = write_tar(tmp_path / "shard.tar", entries)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert index_tar(data, EXTS).keys == SAMPLES
    return data, members


def check_fault(data: bytes, fault: int, expected: list[str], error: bool) -> streams.TarIndex:
    """index_tar keeps ``expected`` (a prefix of the samples, the same as the streaming reader),
    whose image bytes all lie before byte ``fault``."""
    index = index_tar(data, EXTS)  # never raises
    assert index.keys == expected
    assert index.keys == SAMPLES[: len(index.keys)]
    assert (index.error is not None) == error, index.error
    records_keys, _, records_error = read_records(data)
    assert index.keys == records_keys
    assert (records_error is not None) == error
    assert len(index.extensions) == len(index.offsets) == len(index.sizes) == len(index.keys)
    assert all(offset + size <= fault for offset, size in zip(index.offsets, index.sizes))
    check_against_records(data, index)
    return index


def test_truncated_in_a_member(faulty):
    data, members = faulty
    cut = members["s2.png"].offset_data + 100
    check_fault(data[:cut], cut, ["s0", "s1"], error=True)


def test_truncated_in_a_header(faulty):
    data, members = faulty
    cut = members["s3.cls"].offset + 200  # s2 is complete but still in progress: dropped, as _records does
    check_fault(data[:cut], cut, ["s0", "s1"], error=True)


@pytest.mark.parametrize("member", ["s3.cls", "s2.json"])
def test_truncated_at_a_header_boundary(faulty, member):
    """A tar cut between members looks complete: everything before the cut, no error."""
    data, members = faulty
    cut = members[member].offset
    assert cut % 512 == 0
    index = check_fault(data[:cut], cut, ["s0", "s1", "s2"], error=False)
    assert streams._index_clean(data[:cut], EXTS) is not None
    assert columns(index) == columns(streams._walk(data[:cut], EXTS, cut)[0])


@pytest.mark.parametrize("member, expected", [("s2.cls", ["s0"]), ("s2.png", ["s0", "s1"])])
@pytest.mark.parametrize("byte", [0, 110, 130, 140, 150, 257])  # name, gid, size, mtime, checksum, magic
def test_corrupt_header_in_the_third_sample(faulty, member, expected, byte):
    """A flipped header byte: the samples finished before the corrupt header, minus the one in
    progress (its members before the fault are read, the rest never are), as _records does."""
    data, members = faulty
    corrupt = bytearray(data)
    corrupt[members[member].offset + byte] ^= 0x01
    index = check_fault(bytes(corrupt), members[member].offset, expected, error=True)
    assert "checksum" in index.error


@pytest.mark.parametrize("size", [1, 100, 512, 4096, 10240])
def test_random_bytes(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    index = index_tar(data, EXTS)
    assert columns(index) == ([], [], [], [])
    assert index.error
    assert read_records(data)[2] is not None


def test_empty_bytes():
    index = index_tar(b"", EXTS)
    assert columns(index) == ([], [], [], []) and index.error is None
    assert read_records(b"") == ([], [], None)


def test_truncated_in_padding(faulty):
    data, members = faulty
    png = members["s2.png"]
    cut = png.offset_data + png.size + 1  # the image bytes are all there, the padding is not
    assert cut % 512
    check_fault(data[:cut], cut, ["s0", "s1"], error=True)


def test_checksum_field_is_read_up_to_its_nul_like_tarfile(faulty):
    data, members = faulty
    corrupt = bytearray(data)
    corrupt[members["s2.cls"].offset + 155] ^= 0x01  # the space after the checksum's NUL -> '!'
    corrupt = bytes(corrupt)
    with tarfile.open(fileobj=io.BytesIO(corrupt)) as archive:  # tarfile reads up to the NUL too
        names = archive.getnames()
    records_keys, _, records_error = read_records(corrupt)
    assert records_error is None and records_keys == sorted({n.split(".")[0] for n in names})
    assert index_tar(corrupt, EXTS).keys == records_keys


def test_size_field_with_embedded_space_fast_path_matches_walk(tmp_path):
    data = bytearray(write_tar(tmp_path / "shard.tar", [("a.png", b"a" * 100), ("b.png", b"b" * 100)]))
    header = 1024  # b.png's header
    assert data[header + 124 : header + 136] == b"00000000144\0"
    data[header + 131] = ord(" ")  # "0000000 144\0": not an octal number (tarfile rejects it too)
    data[header + 148 : header + 156] = b" " * 8  # the checksum counts its own field as spaces
    data[header + 148 : header + 156] = b"%06o\0 " % sum(data[header : header + 512])
    data = bytes(data)
    assert streams._checksum_ok(data[header : header + 512])
    walked, _ = streams._walk(data, EXTS, len(data))
    assert walked.error  # the exact parse refuses the size field
    fast = streams._index_clean(data, EXTS)
    assert fast is None or columns(fast) == columns(walked)


# --- 3. decode_pixels ---------------------------------------------------------------------------


def _encode(tmp_path: Path, image: Image.Image, fmt: str = "PNG", **settings) -> bytes:
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, format=fmt, **settings)
    return path.read_bytes()


def _pil(payload: bytes, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(payload)) as image:
        pixels = np.asarray(image.convert(mode))
    return pixels.reshape(*pixels.shape[:2], -1)


SIZES = [(28, 28), (9, 17)]  # (height, width): 28x28 and 17 wide by 9 high


@pytest.mark.parametrize("height, width", SIZES)
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_png_in_the_wanted_mode(tmp_path, mode, height, width):
    channels = {"L": 1, "RGB": 3}[mode]
    array = np.random.default_rng(height * width).integers(0, 256, (height, width, channels), dtype=np.uint8)
    payload = _encode(tmp_path, _image(mode, array))
    assert payload[12:16] == b"IHDR" and payload[24] == 8 and payload[25] == {"L": 0, "RGB": 2}[mode]  # pyspng
    pixels = decode_pixels(payload, "png", mode)
    assert pixels.dtype == np.uint8 and pixels.shape == (height, width, channels)
    np.testing.assert_array_equal(pixels, _pil(payload, mode))
    np.testing.assert_array_equal(pixels, array)


def _image(mode: str, array: np.ndarray) -> Image.Image:
    return Image.frombytes(mode, (array.shape[1], array.shape[0]), array.tobytes())


def _source(kind: str, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(sum(map(ord, kind)) + height)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2}
    if kind in channels:
        return _image(kind, rng.integers(0, 256, (height, width, channels[kind]), dtype=np.uint8))
    if kind == "P":
        image = _image("P", rng.integers(0, 16, (height, width), dtype=np.uint8))
        image.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tolist())
        return image
    if kind == "I;16":
        return _image("I;16", rng.integers(0, 65536, (height, width), dtype=np.uint16).astype("<u2"))
    if kind == "1":
        return _image("L", rng.integers(0, 2, (height, width), dtype=np.uint8) * 255).convert("1")
    raise AssertionError(kind)


@pytest.mark.parametrize("height, width", SIZES)
@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("kind", ["RGB", "L", "P", "RGBA", "LA", "I;16", "1"])
def test_png_converted_like_pil(tmp_path, kind, mode, height, width):
    source = _source(kind, height, width)
    assert source.mode == kind
    payload = _encode(tmp_path, source)
    pixels = decode_pixels(payload, "png", mode)
    assert pixels.dtype == np.uint8 and pixels.shape == (height, width, {"L": 1, "RGB": 3}[mode])
    np.testing.assert_array_equal(pixels, _pil(payload, mode))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_png_with_transparency_chunk(tmp_path, mode):
    """An 8-bit PNG in the wanted colour type with a tRNS chunk still goes to pyspng: no alpha."""
    source = _source(mode, 9, 17)
    payload = _encode(tmp_path, source, transparency=(1, 2, 3) if mode == "RGB" else 7)
    assert b"tRNS" in payload
    pixels = decode_pixels(payload, "png", mode)
    assert pixels.shape == (9, 17, len(mode))
    np.testing.assert_array_equal(pixels, _pil(payload, mode))


@pytest.mark.parametrize("ext, fmt", [("jpg", "JPEG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_lossy_formats_equal_pil(tmp_path, ext, fmt, mode):
    payload = _encode(tmp_path, _source("RGB", 28, 28), fmt, quality=80)
    pixels = decode_pixels(payload, ext, mode)
    assert pixels.dtype == np.uint8 and pixels.shape == (28, 28, len(mode))
    np.testing.assert_array_equal(pixels, _pil(payload, mode))


def test_no_image_member():
    with pytest.raises(ValueError):
        decode_pixels(b"", None, "L")


_GOOD_PNG = io.BytesIO()
Image.fromarray(np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)).save(_GOOD_PNG, "PNG")
_GOOD_PNG = _GOOD_PNG.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGB"])  # "L": pyspng's path for this header, "RGB": PIL's
@pytest.mark.parametrize(
    "payload",
    [b"", np.random.default_rng(5).integers(0, 256, 3000, dtype=np.uint8).tobytes(), _GOOD_PNG[: len(_GOOD_PNG) // 2],
     _GOOD_PNG[:30], _GOOD_PNG[:8]],
    ids=["empty", "random", "half-png", "png-cut-in-ihdr", "png-signature-only"],
)
@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_corrupt_payload_raises(payload, mode, ext):
    with pytest.raises(Exception):  # noqa: B017 - any decoder error: the loader counts the sample as corrupt
        decode_pixels(payload, ext, mode)


# --- 4. window_shuffle --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 10, 1000])
@pytest.mark.parametrize("window", [1, 2, 7, 64, 5000])
def test_window_shuffle_is_a_bounded_permutation(n, window):
    order = window_shuffle(n, window, np.random.default_rng(n * 7919 + window))
    assert sorted(order.tolist()) == list(range(n))
    # Position p has key p + u*window with u in [0, 1): every q <= p - window sorts before it and
    # every q >= p + window after it, so its output rank r satisfies |r - p| <= window - 1.
    displacement = np.abs(np.arange(n) - order)
    assert (displacement < window).all()
    if n >= 1000 and window >= 7:
        assert displacement.max() > min(window, n) // 2  # it does shuffle


def test_window_shuffle_depends_only_on_the_seed():
    first = window_shuffle(1000, 64, np.random.default_rng(42))
    np.testing.assert_array_equal(first, window_shuffle(1000, 64, np.random.default_rng(42)))
    assert not np.array_equal(first, window_shuffle(1000, 64, np.random.default_rng(43)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_window_of_one_is_the_identity(seed):
    np.testing.assert_array_equal(window_shuffle(500, 1, np.random.default_rng(seed)), np.arange(500))


def test_a_name_that_is_not_utf8_is_an_error_not_a_crash(tmp_path):
    good = write_tar(tmp_path / "good.tar", [("s0.png", b"a" * 10), ("s1.png", b"b" * 10), ("s2.png", b"c" * 10)])
    data = bytearray(good)
    header = 2 * 1024  # s2.png's header
    data[header] = 0xFF  # the name's first byte: not UTF-8
    data[header + 148 : header + 156] = b" " * 8
    data[header + 148 : header + 156] = b"%06o\0 " % sum(data[header : header + 512])  # still a valid header
    index = index_tar(bytes(data), EXTS)
    keys, _, error = read_records(bytes(data))
    # The streaming reader fails before it has seen s1 end; the index keeps the same samples.
    assert isinstance(error, UnicodeDecodeError) and keys == ["s0"]
    assert index.error and index.keys == keys
