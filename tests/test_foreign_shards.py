"""Shards written elsewhere ("bring your own shards", issue #16): ``pipeline-shards index`` writes
their manifest, and with it they train in epoch mode, evaluate and resume like our own.

The shards are made by ``webdataset.TarWriter``, as users make theirs, with ``.jpg``, ``.png``,
``.webp``, ``.cls``, ``.json`` and ``.txt`` members and a few samples that hold no image. The
reference for what a sample is: ``webdataset.WebDataset`` on the same files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.checkpoint import load_checkpoint
from pipeline.data import streams
from pipeline.data.loader import EpochIterator, make_loader
from pipeline.data.plan import PlanError, Shard
from pipeline.data.streams import IMAGE_EXTENSIONS, StreamOptions, index_tar, split_key
from tests.servers import Nginx
from tests.test_elastic_data import stint
from tests.test_loader import needs_nginx, one_epoch, rank_iterator
from tests.test_shards_cli import photo

REPO = Path(__file__).resolve().parents[1]
TRAIN_COUNTS = [9, 12, 7, 15, 10, 11]  # samples with an image per shard: uneven, as found in the wild
HELDOUT_COUNTS = [6, 5]
WITHOUT_IMAGE = {("train", 1): 1, ("train", 4): 2, ("heldout", 0): 1}  # (split, shard) -> samples with no image
FORMATS = ("jpg", "png", "webp")


def crop(n: int, size: int = 32) -> np.ndarray:
    """A real photograph's ``size`` x ``size`` crop, a different one for each n."""
    return photo(size, size, top=(n * 37) % (512 - size), left=(n * 91) % (512 - size))


def webp(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "WEBP", quality=90)  # TarWriter has no webp encoder
    return buffer.getvalue()


def write_foreign_split(folder: Path, split: str, counts: list[int], size: int = 32) -> list[Path]:
    """``<split>-000000.tar``... written by ``webdataset.TarWriter`` the way users' scripts do:
    keys like img2dataset's, an image as jpg, png (some grayscale) or webp, and a label, a
    caption and metadata beside it; some samples carry no image at all."""
    paths = []
    for number, count in enumerate(counts):
        path = folder / f"{split}-{number:06d}.tar"
        missing = WITHOUT_IMAGE.get((split, number), 0)
        with wds.TarWriter(str(path)) as writer:
            for i in range(count + missing):
                key = f"{split[0]}{number:04d}{i:05d}"
                sample = {"__key__": key, "cls": i % 10, "txt": f"caption {key}", "json": {"key": key, "i": i}}
                if i >= missing:  # the first `missing` samples of the shard have no image
                    pixels = crop(number * 100 + i + (0 if split == "train" else 50), size)
                    ext = FORMATS[i % 3]
                    if ext == "png" and i % 2:
                        pixels = np.asarray(Image.fromarray(pixels).convert("L"))  # grayscale: loaded as RGB
                    sample[ext] = webp(pixels) if ext == "webp" else pixels
                writer.write(sample)
        paths.append(path)
    return paths


def webdataset_samples(url: str) -> list[dict]:
    """What webdataset itself makes of a shard: its samples, in order."""
    return list(wds.WebDataset(url, shardshuffle=False, empty_check=False))


def image_keys(url: str) -> list[str]:
    return [s["__key__"] for s in webdataset_samples(url) if set(s) & set(IMAGE_EXTENSIONS)]


def index_cli(*args: str | Path, check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``pipeline-shards index ...`` as a real process, with this checkout's code."""
    command = [sys.executable, "-m", "pipeline.data.shards", "index", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """TarWriter shards (6 train, 2 held-out) and the manifest the indexer writes beside them."""
    folder = tmp_path_factory.mktemp("foreign")
    train = write_foreign_split(folder, "train", TRAIN_COUNTS)
    heldout = write_foreign_split(folder, "heldout", HELDOUT_COUNTS)
    result = index_cli(f"train={folder}/train-{{000000..000005}}.tar", f"heldout={folder}/heldout-*.tar",
                       "--out", folder / "manifest.json")  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_text())
    return folder, train, heldout, manifest, result


def all_keys(paths: list[Path]) -> set[str]:
    return {k for p in paths for k in image_keys(str(p))}


# --- the manifest -------------------------------------------------------------------------------


def test_index_writes_the_shard_writers_manifest_for_tarwriter_shards(foreign):
    _, train, heldout, manifest, _ = foreign
    assert manifest["container"] == "webdataset-tar" and set(manifest["splits"]) == {"train", "heldout"}
    for split, paths, counts in (("train", train, TRAIN_COUNTS), ("heldout", heldout, HELDOUT_COUNTS)):
        entry = manifest["splits"][split]
        # Named as the shard writer names its shards: relative to the manifest's folder.
        assert [s["name"] for s in entry["shards"]] == [p.name for p in paths]
        assert [s["samples"] for s in entry["shards"]] == counts == [len(image_keys(str(p))) for p in paths]
        assert entry["samples"] == sum(counts)
        for shard, path in zip(entry["shards"], paths):
            data = path.read_bytes()
            assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
            assert shard["without_image"] == len(webdataset_samples(str(path))) - shard["samples"]
        assert entry["without_image"] == sum(n for (s, _), n in WITHOUT_IMAGE.items() if s == split)
        assert entry["members"]["cls"] == entry["members"]["txt"] == entry["samples"] + entry["without_image"]
        assert "pixel_stats" in entry and entry["pixel_stats"]["estimated_from_images"] == 4 * len(paths)
    assert manifest["image_size"] == 32 and manifest["channels"] == 3
    assert manifest["format"] == "mixed" and set(manifest["formats"]) == set(FORMATS)
    check = manifest["image_check"]
    # 4 images decoded per shard (the default), and the manifest says that is not all of them.
    assert check["decoded"] == 4 * 8 and check["samples"] == sum(TRAIN_COUNTS + HELDOUT_COUNTS)
    assert not check["all_checked"] and check["uniform_size"] and check["sizes"] == {"32x32": 32}


def test_samples_without_an_image_are_counted_and_named(foreign):
    folder, _, _, manifest, result = foreign
    assert manifest["splits"]["train"]["without_image_examples"][0] == f"{folder}/train-000001.tar#t000100000"
    assert "train: 3 samples have no png/jpg/jpeg/webp member and are not counted" in result.stderr
    assert "heldout: 1 samples have no" in result.stderr and "heldout-000000.tar#h000000000" in result.stderr


def test_every_image_decoded_gives_exact_statistics_and_sizes_that_vary_are_reported(foreign, tmp_path):
    folder, train, _, _, _ = foreign
    index_cli(f"{folder}/train-{{000000..000005}}.tar", "--sample-images", "all", "--out", tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    check, entry = manifest["image_check"], manifest["splits"]["train"]
    assert check["all_checked"] and check["decoded"] == check["samples"] == sum(TRAIN_COUNTS)
    assert "estimated_from_images" not in entry["pixel_stats"]
    pixels = [np.asarray(Image.open(io.BytesIO(s[e])).convert("RGB")) for p in train
              for s in webdataset_samples(str(p)) for e in IMAGE_EXTENSIONS if e in s]  # fmt: skip
    assert entry["pixel_stats"]["pixels"] == 32 * 32 * len(pixels)
    np.testing.assert_allclose(entry["pixel_stats"]["mean"], np.stack(pixels).reshape(-1, 3).mean(0))
    # Outside the shards' folder: shards named by absolute path, which works from anywhere.
    assert [s["name"] for s in entry["shards"]] == [str(p) for p in train]

    odd = tmp_path / "odd"
    odd.mkdir()
    write_foreign_split(odd, "train", [3], size=32)
    write_foreign_split(odd, "other", [2], size=24)
    result = index_cli(f"{odd}/*.tar", "--sample-images", "all")  # --out: beside the shards
    manifest = json.loads((odd / "manifest.json").read_text())
    assert manifest["image_size"] is None and not manifest["image_check"]["uniform_size"]
    assert manifest["image_check"]["sizes"] == {"32x32": 3, "24x24": 2}
    assert "different sizes" in result.stderr


def test_names_are_relative_to_the_manifest_so_training_reads_them_from_anywhere(tmp_path):
    data = tmp_path / "data"
    (data / "shards").mkdir(parents=True)
    write_foreign_split(data / "shards", "train", [3, 4])
    # Relative arguments, from the folder above the data, and a manifest one level above the shards.
    index_cli("data/shards/train-{000000..000001}.tar", "--out", "data/manifest.json", cwd=tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]] == [
        "shards/train-000000.tar", "shards/train-000001.tar"]  # fmt: skip
    moved = tmp_path / "moved"
    data.rename(moved)  # the folder moves as a whole; training runs from elsewhere (the repository)
    loader, dataset = make_loader(f"{moved}/manifest.json#train", batch_size=2, train=False)
    keys = [k for b in one_epoch(EpochIterator(loader, dataset)) for k in b]
    assert sorted(keys) == sorted(all_keys(sorted((moved / "shards").glob("*.tar"))))
    index_cli(f"{moved}/shards/train-000000.tar", "--out", moved, "--absolute")
    assert json.loads((moved / "manifest.json").read_text())["splits"]["train"]["shards"][0]["name"] == str(
        moved / "shards" / "train-000000.tar")  # fmt: skip


def test_unreadable_shards_fail_the_index_or_are_left_out(foreign, tmp_path):
    _, train, _, _, _ = foreign
    cut = tmp_path / "cut.tar"
    cut.write_bytes(train[0].read_bytes()[:3000])
    result = index_cli(train[1], cut, "--out", tmp_path, check=False)
    assert result.returncode == 2 and "cut.tar" in result.stderr and not (tmp_path / "manifest.json").exists()
    index_cli(train[1], cut, "--out", tmp_path, "--skip-bad")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]] == [str(train[1])]
    assert manifest["skipped"]["count"] == 1 and "cut.tar" in manifest["skipped"]["files"][0]


# --- keys: webdataset's rule --------------------------------------------------------------------

ODD_NAMES = [  # (member name, payload): names whose key only webdataset's rule decides
    ("./a.b/c.jpg", "image"), ("./a.b/c.cls", b"1"),  # a dot in a folder name
    ("./a.b/c2.seg.png", "image"), ("./a.b/c2.png", "image"),  # several dots in a file name
    ("x.y.z.jpg", "image"), ("x.json", b"{}"),  # key "x": its "image" is a "y.z.jpg" member
    ("d/README", b"no dot: not a member of any sample"), ("d/e.webp", "image"),
    ("__meta__/info.json", b"{}"), ("__index__", b""),  # webdataset's metadata: skipped
    ("f/.hidden.png", "image"), ("f/g.PNG", "image"),  # a file name that starts with a dot; upper case
    ("h.txt", b"text only"), ("i.jpeg", "image"),
]


def write_odd_tar(path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for n, (name, payload) in enumerate(ODD_NAMES):
            if payload == "image":
                buffer = io.BytesIO()
                Image.fromarray(crop(n, 16)).save(buffer, "PNG" if "png" in name.lower() else "JPEG")
                payload = buffer.getvalue() if not name.endswith("webp") else webp(crop(n, 16))
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_split_key_is_webdatasets_base_plus_ext():
    from webdataset.tariterators import base_plus_ext

    names = [n for n, _ in ODD_NAMES] + ["a", "a.", ".a", "a/.b.c", "a..b", "x/y.z/.w.png", "__k__.jpg", "a/__b__"]
    for name in names:
        key, ext = base_plus_ext(name)
        skipped = name.startswith("__") and (name.endswith("__") or "__/" in name)
        expected = None if key is None or skipped else (key, ext.lower())
        assert split_key(name) == expected, name


def test_keys_and_counts_are_webdatasets_on_odd_names_and_tarwriter_shards(foreign, tmp_path):
    _, train, heldout, _, _ = foreign
    odd = tmp_path / "odd.tar"
    write_odd_tar(odd)
    for path in [odd, *train, *heldout]:
        reference = webdataset_samples(str(path))
        keys = [s["__key__"] for s in reference]
        with_image = [s["__key__"] for s in reference if set(s) & set(IMAGE_EXTENSIONS)]
        data = path.read_bytes()
        records = list(streams._records(io.BytesIO(data), True, lambda i: True, IMAGE_EXTENSIONS))
        assert [r.key for r in records] == keys, path.name  # the streaming reader
        assert index_tar(data, IMAGE_EXTENSIONS).keys == keys, path.name  # the index of mapped shards
        counted = list(streams._records(io.BytesIO(data), True, lambda i: True, IMAGE_EXTENSIONS, True))
        assert [r.key for r in counted] == with_image and [r.index for r in counted] == list(range(len(with_image)))
    # The odd names make 8 samples, 3 without an image: "x" (its jpg is a "y.z.jpg" member), "f/" (a
    # "hidden.png" member) and "h"; "d/README" and the metadata belong to no sample.
    samples = ["./a.b/c", "./a.b/c2", "x", "d/e", "f/", "f/g", "h", "i"]
    assert [s["__key__"] for s in webdataset_samples(str(odd))] == samples
    assert image_keys(str(odd)) == ["./a.b/c", "./a.b/c2", "d/e", "f/g", "i"]

    # The loader, through the indexer's manifest, reads exactly webdataset's samples with an image.
    index_cli(odd, "--out", tmp_path)
    shard = json.loads((tmp_path / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    assert (shard["samples"], shard["without_image"]) == (5, 3)
    # Mapped (a local file) and streamed (a pipe: the header-by-header reader) alike.
    for shards in (f"{tmp_path}/manifest.json#train", [Shard(f"pipe:cat {odd}", 5)]):
        loader, dataset = make_loader(shards, batch_size=2, train=False, options=StreamOptions(allow_pipe=True))
        iterator = EpochIterator(loader, dataset)
        batches = one_epoch(iterator)
        assert sorted(k for b in batches for k in b) == sorted(image_keys(str(odd)))
        assert iterator.counts()["corrupt"] == iterator.counts()["missing"] == 0


# --- training on them: exactly once, evaluation, resume ------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epoch_reads_every_image_sample_once_on_two_ranks(foreign, num_workers):
    folder, train, _, _, _ = foreign
    expected = all_keys(train)
    for epoch in range(2):
        per_rank = []
        for rank in range(2):
            iterator = rank_iterator(f"{folder}/manifest.json#train", rank, num_workers=num_workers, batch_size=4)
            iterator.load_state_dict({"epoch": epoch, "batches_in_epoch": 0})
            per_rank.append(one_epoch(iterator))
            assert iterator.counts()["corrupt"] == iterator.counts()["missing"] == 0
        assert len(per_rank[0]) == len(per_rank[1])
        keys = [k for batches in per_rank for b in batches for k in b]
        assert len(keys) == len(set(keys)) == sum(TRAIN_COUNTS) and set(keys) == expected


def test_evaluation_reads_every_heldout_sample_once_on_two_ranks_two_workers(foreign):
    folder, _, heldout, _, _ = foreign
    keys = []
    for rank in range(2):
        # (No #split: a loader with train=False reads "heldout", as evaluation does.)
        loader, _ = make_loader(f"{folder}/manifest.json", batch_size=2, train=False, num_workers=2,
                                rank=rank, world_size=2)  # fmt: skip
        batches = list(loader)
        assert all(b["image"].shape[1:] == (3, 32, 32) for b in batches)
        keys += [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == sum(HELDOUT_COUNTS) and set(keys) == all_keys(heldout)


def test_resume_is_exact_on_the_same_layout_and_on_another(foreign):
    folder, train, _, _, _ = foreign
    urls = f"{folder}/manifest.json#train"
    reference = rank_iterator(urls, 1, batch_size=4, hflip=True)
    expected = [next(reference) for _ in range(6)]
    _, states, _ = stint(urls, 2, 2, 4, 2, hflip=True)
    resumed = rank_iterator(urls, 1, batch_size=4, hflip=True)
    resumed.resume(states)
    got = [next(resumed) for _ in range(4)]
    assert [b["key"] for b in got] == [b["key"] for b in expected[2:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, expected[2:]))

    keys, states = [], None
    for world_size, num_workers, batch_size, batches in [(2, 2, 4, 3), (1, 2, 5, 2), (2, 0, 3, None)]:
        taken, states, _ = stint(urls, world_size, num_workers, batch_size, batches, states)
        keys += taken
    assert len(keys) == len(set(keys)) and set(keys) == all_keys(train)


def test_without_a_manifest_the_error_names_the_index_command(tmp_path):
    write_foreign_split(tmp_path, "train", [4, 4])
    with pytest.raises(PlanError, match=r"pipeline-shards index 'SHARDS' --out DIR/manifest.json") as error:
        make_loader(f"{tmp_path}/train-{{000000..000001}}.tar", batch_size=2)[1].batches_per_worker(0)
    assert "2 of 2 have none" in str(error.value) and "data.mode=resampled" in str(error.value)
    index_cli(f"{tmp_path}/train-{{000000..000001}}.tar")
    # With the manifest beside them, the same pattern now has its counts.
    assert make_loader(f"{tmp_path}/train-{{000000..000001}}.tar", batch_size=2)[1].planned_samples(0) == 8


@needs_nginx
def test_index_over_http_and_train_through_its_manifest(foreign, tmp_path):
    folder, train, _, local, _ = foreign
    with Nginx(folder, tmp_path / "nginx") as nginx:
        index_cli(f"{nginx.url}/train-{{000000..000005}}.tar", "--workers", "3", "--out", tmp_path)
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        entry = manifest["splits"]["train"]
        assert [s["name"] for s in entry["shards"]] == [f"{nginx.url}/{p.name}" for p in train]
        for key in ("samples", "bytes", "sha256", "without_image"):
            assert [s[key] for s in entry["shards"]] == [s[key] for s in local["splits"]["train"]["shards"]], key
        per_rank = [one_epoch(rank_iterator(f"{tmp_path}/manifest.json#train", r, batch_size=4)) for r in range(2)]
    keys = [k for batches in per_rank for b in batches for k in b]
    assert len(keys) == len(set(keys)) == sum(TRAIN_COUNTS) and set(keys) == all_keys(train)


@pytest.mark.slow
def test_a_real_run_trains_and_evaluates_on_tarwriter_shards(foreign, tmp_path, launch):
    folder, _, _, _, _ = foreign
    run_dir = tmp_path / "run"
    result = launch(run_dir, f"data.train_urls={folder}/manifest.json#train",
                    f"data.eval_urls={folder}/manifest.json#heldout", "data.num_workers=2", "train.steps=4",
                    "train.eval_every=2", "checkpoint.every=4")  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 4
    assert np.isfinite(summary["first_eval"]["eval/loss"]) and np.isfinite(summary["final_eval"]["eval/loss"])
    assert "no pixel statistics" not in result.stderr  # the sampled statistics standardise the input
    _, _, state = load_checkpoint(run_dir / "checkpoints" / "step_000004")
    assert (state["data"][0]["epoch"], state["data"][0]["batches_in_epoch"]) == (0, 4)  # 8 batches an epoch
