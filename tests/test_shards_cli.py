"""The shard writer CLI (`python -m pipeline.data.shards`) on real and hand-made sources."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.shards import main, write_dataset
from pipeline.data.sources import NumpyOnlyUnpickler
from tests.conftest import FASHION_MNIST

REPO = Path(__file__).resolve().parents[1]
FASHION = FASHION_MNIST
FASHION_IMAGES = FASHION / "t10k-images-idx3-ubyte.gz"
LIMIT = 2000


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    """The CLI as a real process, as a user runs it."""
    command = [sys.executable, "-m", "pipeline.data.shards", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)


def run_ok(*args: str | Path) -> dict:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return json.loads((Path(args[1]) / "manifest.json").read_text())


def read_shard(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """A shard's samples in order: ``[(key, {extension: payload})]``."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, extension = member.name.split(".", 1)
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return list(samples.items())


def read_split(out: Path, manifest: dict, split: str) -> list[tuple[str, np.ndarray, dict]]:
    """Every ``(key, pixels, meta)`` of a split, decoded, in shard order."""
    decoded = []
    for shard in manifest["splits"][split]["shards"]:
        for key, members in read_shard(out / shard["name"]):
            (image_ext,) = set(members) - {"json"}
            pixels = np.asarray(Image.open(io.BytesIO(members[image_ext])))
            decoded.append((key, pixels, json.loads(members["json"])))
    return decoded


def shard_digests(manifest: dict) -> dict[str, list[str]]:
    return {split: [s["sha256"] for s in entry["shards"]] for split, entry in manifest["splits"].items()}


def read_idx(path: Path) -> np.ndarray:
    """Parsed here independently of the code under test: magic, dims, then the data."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = np.frombuffer(data, ">u4", count=ndim, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def photo(height: int, width: int, top: int = 0, left: int = 0) -> np.ndarray:
    """A real photograph's crop (skimage's astronaut, from the installed package), RGB uint8."""
    import skimage.data

    path = Path(skimage.data.__file__).parent / "astronaut.png"
    return np.asarray(Image.open(path).convert("RGB"))[top : top + height, left : left + width].copy()


def resize_and_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """What --resolution should do: short side to ``size`` (Lanczos), then the centre square."""
    image = Image.fromarray(pixels)
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.LANCZOS)
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


# --- Fashion-MNIST, the real files ------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    assert FASHION_IMAGES.exists(), f"no Fashion-MNIST at {FASHION} (nor in /usr/share/datasets)"
    out = tmp_path_factory.mktemp("fashion") / "a"
    args = ["--samples-per-shard", "300", "--heldout-fraction", "0.1", "--seed", "3", "--limit", str(LIMIT)]
    return out, run_ok(FASHION_IMAGES, out, *args), args


def test_fashion_mnist_manifest_counts_and_checksums_are_true(fashion):
    out, manifest, _ = fashion
    assert set(manifest["splits"]) == {"train", "heldout"}
    train, heldout = manifest["splits"]["train"], manifest["splits"]["heldout"]
    assert train["samples"] + heldout["samples"] == LIMIT
    assert 0.07 < heldout["samples"] / LIMIT < 0.13
    assert manifest["image_size"] == 28 and manifest["channels"] == 1 and manifest["format"] == "png"
    assert manifest["source"]["kind"] == "idx" and manifest["args"]["limit"] == LIMIT
    for split, entry in manifest["splits"].items():
        assert [s["name"] for s in entry["shards"]] == [f"{split}-{i:06d}.tar" for i in range(len(entry["shards"]))]
        assert entry["pattern"] == f"{split}-{{000000..{len(entry['shards']) - 1:06d}}}.tar"
        assert sum(s["samples"] for s in entry["shards"]) == entry["samples"]
        assert all(s["samples"] == 300 for s in entry["shards"][:-1])
        for shard in entry["shards"]:
            data = (out / shard["name"]).read_bytes()
            assert shard["bytes"] == len(data)
            assert shard["sha256"] == hashlib.sha256(data).hexdigest()
            assert len(read_shard(out / shard["name"])) == shard["samples"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [s["name"] for e in manifest["splits"].values() for s in e["shards"]]
    )  # no temporary files left


def test_fashion_mnist_pixels_and_labels_survive_exactly(fashion):
    out, manifest, _ = fashion
    images = read_idx(FASHION_IMAGES)
    labels = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    seen = []
    for split in ("train", "heldout"):
        samples = read_split(out, manifest, split)
        indices = [meta["index"] for _, _, meta in samples]
        assert indices == sorted(indices)  # each split keeps the source order
        for key, pixels, meta in samples:
            assert key == f"t10k_{meta['index']:06d}"
            assert pixels.dtype == np.uint8 and pixels.shape == (28, 28)
            assert np.array_equal(pixels, images[meta["index"]])
            assert meta["label"] == int(labels[meta["index"]])
        seen += indices
    assert sorted(seen) == list(range(LIMIT))  # every image once, in one split only


def test_fashion_mnist_shards_read_through_webdataset(fashion):
    import webdataset as wds

    out, manifest, _ = fashion
    urls = str(out / manifest["splits"]["heldout"]["pattern"])
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == manifest["splits"]["heldout"]["samples"]
    assert {"png", "json"} <= set(samples[0])


def test_fashion_mnist_rerun_and_two_workers_give_identical_bytes(fashion, tmp_path):
    _, first, args = fashion
    again = run_ok(FASHION_IMAGES, tmp_path / "b", *args)
    parallel = run_ok(FASHION_IMAGES, tmp_path / "c", *args, "--workers", "2")
    assert shard_digests(again) == shard_digests(first)
    assert shard_digests(parallel) == shard_digests(first)
    assert again["splits"] == first["splits"] == parallel["splits"]  # names, counts and sizes too


def test_bytes_per_shard_is_a_bound(tmp_path):
    bound = 60_000
    manifest = run_ok(FASHION_IMAGES, tmp_path, "--bytes-per-shard", str(bound), "--limit", "1500", "--name", "fm")
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 3 and manifest["splits"]["train"]["samples"] == 1500
    assert all(s["bytes"] <= bound or s["samples"] == 1 for s in shards)
    assert all(s["name"].startswith("fm-train-") for s in shards)
    assert manifest["splits"]["train"]["pattern"].startswith("fm-train-{")
    assert manifest["name"] == "fm"
    # Shards are filled: the next sample would not have fitted (each 28x28 sample adds >= 1.5 KiB).
    assert all(s["bytes"] > bound - 12_000 for s in shards[:-1])


def test_a_sample_larger_than_the_bound_gets_a_shard_of_its_own(tmp_path):
    # No tar is smaller than 10 KiB (tarfile pads to a 10 KiB record), so each sample overflows.
    manifest = run_ok(FASHION_IMAGES, tmp_path, "--bytes-per-shard", "5000", "--limit", "4")
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [1, 1, 1, 1]


# --- an image folder with class subfolders ------------------------------------------------------


@pytest.fixture
def class_folder(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """cat/ and dog/ of non-square photo crops (png and jpg), plus one corrupt file."""
    root = tmp_path / "photos"
    crops = {
        "cat/a.png": photo(40, 64, 100, 150),
        "cat/b.png": photo(70, 30, 200, 220),
        "dog/c.jpg": photo(50, 50, 10, 10),
        "dog/d.png": photo(33, 90, 300, 100),
    }
    for name, pixels in crops.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "dog" / "notes.txt").write_text("not an image extension: ignored, not skipped")
    return root, crops


def test_image_folder_labels_resizing_and_a_skipped_corrupt_file(class_folder, tmp_path):
    root, crops = class_folder
    out = tmp_path / "out"
    result = run_cli(root, out, "--samples-per-shard", "3", "--resolution", "16")
    assert result.returncode == 0, result.stderr
    assert "broken.png" in result.stderr and "skipped 1 unreadable" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"count": 1, "files": ["dog/broken.png"]}
    assert manifest["image_size"] == 16 and manifest["channels"] == 3 and manifest["source"]["kind"] == "folder"
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [3, 1]
    samples = read_split(out, manifest, "train")
    assert [meta["file"] for _, _, meta in samples] == sorted(crops)
    for key, pixels, meta in samples:
        assert pixels.shape == (16, 16, 3)
        assert meta["class"] == meta["file"].split("/")[0]
        assert meta["label"] == ["cat", "dog"].index(meta["class"])
        assert "." not in key
        source = np.asarray(Image.open(root / meta["file"]).convert("RGB"))  # the jpg as decoded
        assert np.array_equal(pixels, resize_and_crop(source, 16))  # centre crop, not a stretch


def test_channels_1_converts_colour_to_grayscale(class_folder, tmp_path):
    root, crops = class_folder
    assert main([str(root), str(tmp_path), "--samples-per-shard", "10", "--channels", "1"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["channels"] == 1 and manifest["image_size"] is None  # the crops differ in size
    for _, pixels, meta in read_split(tmp_path, manifest, "train"):
        expected = np.asarray(Image.open(root / meta["file"]).convert("L"))
        assert np.array_equal(pixels, expected)


def test_a_folder_without_class_subfolders_has_no_labels(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        Image.fromarray(photo(20, 20, 50 * i, 0)).save(root / f"img {i}.bmp")
    assert main([str(root), str(tmp_path / "out"), "--samples-per-shard", "5"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    samples = read_split(tmp_path / "out", manifest, "train")
    assert [key for key, _, _ in samples] == ["img_0_bmp", "img_1_bmp", "img_2_bmp"]
    assert all("label" not in meta for _, _, meta in samples)
    assert manifest["image_size"] == 20


# --- CIFAR batches ------------------------------------------------------------------------------


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> CIFAR's (N, 3072) rows: the red plane, then green, then blue."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def test_cifar10_batch_round_trips_with_the_channel_layout_right(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    images[0] = (255, 0, 0)  # pure red: a wrong plane order shows as blue or green
    images[1, :16] = (0, 0, 255)  # blue top half
    labels = [3, 1, 4, 1, 5, 9]
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    (batches / "data_batch_1").write_bytes(pickle.dumps({b"data": cifar_rows(images), b"labels": labels}))
    names = [f"class{i}".encode() for i in range(10)]
    (batches / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))

    out = tmp_path / "out"
    manifest = run_ok(batches, out, "--samples-per-shard", "4")
    assert manifest["source"]["kind"] == "cifar" and manifest["image_size"] == 32 and manifest["channels"] == 3
    samples = read_split(out, manifest, "train")
    assert [key for key, _, _ in samples] == [f"data_batch_1_{i:05d}" for i in range(6)]
    for (_, pixels, meta), image, label in zip(samples, images, labels):
        assert np.array_equal(pixels, image)
        assert meta["label"] == label and meta["class"] == f"class{label}"
    assert tuple(samples[0][1][5, 5]) == (255, 0, 0)
    assert tuple(samples[1][1][0, 0]) == (0, 0, 255)


def test_python2_pickles_like_the_real_cifar_files_load(tmp_path):
    """The real CIFAR files were pickled by Python 2: protocol 2, str as BINSTRING, and the
    old module name numpy.core.multiarray. Hand-written opcodes for a (2, 3) uint8 array."""

    def string(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R"
        + b"(K\x01K\x02K\x03\x86cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R(K\x03" + string(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + string(bytes(range(6))) + b"tb"
    )  # fmt: skip
    payload = b"\x80\x02}(" + string(b"fine_labels") + b"](K\x07K\x08e" + string(b"data") + array + b"u."
    loaded = NumpyOnlyUnpickler(io.BytesIO(payload), encoding="bytes").load()
    assert loaded[b"fine_labels"] == [7, 8]
    assert np.array_equal(loaded[b"data"], np.arange(6, dtype=np.uint8).reshape(2, 3))


class RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_naming_any_other_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    batch = tmp_path / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": RunsACommand(marker), b"labels": [0]}))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        NumpyOnlyUnpickler(io.BytesIO(batch.read_bytes()), encoding="bytes").load()
    result = run_cli(batch, tmp_path / "out", "--samples-per-shard", "4")
    assert result.returncode == 2
    assert "refusing to unpickle" in result.stderr and "system" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


# --- a list of paths; jpg and webp ----------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["jpg", "webp"])
def test_path_list_with_lossy_formats(tmp_path, image_format):
    images = tmp_path / "images"
    images.mkdir()
    crops = [photo(48, 64, 0, 0), photo(64, 40, 200, 200), photo(30, 30, 400, 300)]
    for i, pixels in enumerate(crops):
        Image.fromarray(pixels).save(images / f"{i}.png")
    listing = tmp_path / "lists" / "files.txt"
    listing.parent.mkdir()
    listing.write_text(f"# three photos\n../images/2.png\n\n{images / '0.png'}\n  ../images/1.png  \n")

    def write(out: Path) -> dict:
        args = [str(listing), str(out), "--samples-per-shard", "2", "--format", image_format, "--resolution", "24"]
        assert main([*args, "--quality", "90"]) == 0
        return json.loads((out / "manifest.json").read_text())

    manifest = write(tmp_path / "a")
    assert manifest["format"] == image_format and manifest["source"]["kind"] == "list"
    samples = read_split(tmp_path / "a", manifest, "train")
    assert [meta["file"] for _, _, meta in samples] == ["../images/2.png", str(images / "0.png"), "../images/1.png"]
    assert [meta["line"] for _, _, meta in samples] == [2, 4, 5]
    for (_, pixels, _), source in zip(samples, [crops[2], crops[0], crops[1]]):
        assert pixels.shape == (24, 24, 3)
        error = np.abs(pixels.astype(int) - resize_and_crop(source, 24).astype(int)).mean()
        assert error < 6  # lossy, but the same picture
    with tarfile.open(tmp_path / "a" / manifest["splits"]["train"]["shards"][0]["name"]) as tar:
        assert tar.getnames()[0].endswith(f".{image_format}")
    assert shard_digests(write(tmp_path / "b")) == shard_digests(manifest)  # deterministic encoder


# --- the library functions the builtin dataset uses -------------------------------------------------


def test_write_dataset_keeps_its_defaults_and_takes_a_prefix_and_byte_bound(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(f"s{i}", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), {"i": i}) for i in range(9)]
    plain = write_dataset(tmp_path / "plain", {"train": iter(samples)}, 4, {"name": "x"})
    assert [s["name"] for s in plain["splits"]["train"]["shards"]] == [f"train-00000{i}.tar" for i in range(3)]
    bounded = write_dataset(tmp_path / "b", {"train": iter(samples)}, info={}, bytes_per_shard=20_000, prefix="p")
    shards = bounded["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(s["name"].startswith("p-train-") and s["bytes"] <= 20_000 for s in shards)
    assert sum(s["samples"] for s in shards) == 9


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["{missing}", "{out}", "--samples-per-shard", "5"], "does not exist"),
        (["{folder}", "{out}", "--samples-per-shard", "5", "--format", "gif"], "invalid choice: 'gif'"),
        (["{folder}", "{out}", "--samples-per-shard", "5", "--bytes-per-shard", "9000"], "not allowed with argument"),
        (["{folder}", "{out}"], "one of the arguments --samples-per-shard --bytes-per-shard is required"),
        (["{folder}", "{out}", "--bytes-per-shard", "12X"], "not a byte size"),
        (["{folder}", "{out}", "--samples-per-shard", "0"], "must be at least 1"),
        (["{folder}", "{out}", "--samples-per-shard", "5", "--heldout-fraction", "1.5"], "must be in [0, 1)"),
        (["{folder}", "{out}", "--samples-per-shard", "5", "--quality", "80"], "--quality applies to"),
        (["{folder}", "{out}", "--samples-per-shard", "5", "--name", "a/b"], "--name"),
        (["{fake_idx}", "{out}", "--samples-per-shard", "5"], "not an idx file"),
        (["{folder}", "{out}", "--samples-per-shard", "5"], "no images"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(tmp_path, arguments, message):
    folder = tmp_path / "empty"
    folder.mkdir()
    fake_idx = tmp_path / "train-images-idx3-ubyte"
    fake_idx.write_text("hello")
    paths = {"missing": tmp_path / "nope", "out": tmp_path / "out", "folder": folder, "fake_idx": fake_idx}
    result = run_cli(*[a.format(**paths) for a in arguments])
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert message in last_line and "error" in last_line
    assert not (tmp_path / "out" / "manifest.json").exists()


def true_statistics(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of decoded images, in float64, without the code under test."""
    pixels = np.stack(images).astype(np.float64)
    channels = pixels.reshape(-1, 1 if pixels.ndim == 3 else pixels.shape[-1])
    return channels.mean(0), channels.std(0)


def test_fashion_mnist_manifest_holds_the_true_pixel_mean_and_std_of_each_split(fashion, tmp_path):
    """The statistics the encoder's input is standardised with are those of the images written
    (decoded back from the shards here), per split, for 1 and 2 workers alike."""
    out, manifest, args = fashion
    for split, entry in manifest["splits"].items():
        mean, std = true_statistics([pixels for _, pixels, _ in read_split(out, manifest, split)])
        stats = entry["pixel_stats"]
        assert stats["pixels"] == entry["samples"] * 28 * 28
        assert np.allclose(stats["mean"], mean, rtol=0, atol=1e-9) and len(stats["mean"]) == 1
        assert np.allclose(stats["std"], std, rtol=0, atol=1e-9) and len(stats["std"]) == 1
    assert 50 < manifest["splits"]["train"]["pixel_stats"]["mean"][0] < 100  # Fashion-MNIST: ~73 (dark background)
    parallel = run_ok(FASHION_IMAGES, tmp_path / "c", *args, "--workers", "2")
    assert parallel["splits"] == manifest["splits"]
