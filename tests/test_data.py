import hashlib
import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data.builtin import ensure_builtin_dataset
from pipeline.data.loader import EpochIterator, make_loader
from pipeline.data.shards import read_manifest, split_urls, write_dataset


def _random_samples(n, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (32, 32, channels) if channels == 3 else (32, 32)
    return [(f"img{i:04d}", rng.integers(0, 256, shape, dtype=np.uint8), {"index": i}) for i in range(n)]


def test_shard_round_trip_is_lossless_and_the_manifest_is_true(tmp_path):
    train, heldout = _random_samples(7), _random_samples(2, seed=1)
    manifest = write_dataset(tmp_path, {"train": iter(train), "heldout": iter(heldout)}, 3, {"name": "t"})
    assert read_manifest(tmp_path) == manifest
    shards = manifest["splits"]["train"]["shards"]
    assert [s["samples"] for s in shards] == [3, 3, 1]
    assert manifest["splits"]["train"]["samples"] == 7
    for shard in shards:
        data = (tmp_path / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data)
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()

    urls = split_urls(tmp_path, manifest, "train")
    assert urls.endswith("train-{000000..000002}.tar")
    read = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in read] == [k for k, _, _ in train]
    for sample, (_, image, meta) in zip(read, train):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), image)
        assert json.loads(sample["json"]) == meta


def test_the_same_input_gives_the_same_bytes(tmp_path):
    a = write_dataset(tmp_path / "a", {"train": iter(_random_samples(5))}, 2, {})
    b = write_dataset(tmp_path / "b", {"train": iter(_random_samples(5))}, 2, {})
    assert [s["sha256"] for s in a["splits"]["train"]["shards"]] == [s["sha256"] for s in b["splits"]["train"]["shards"]]


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must not contain"):
        write_dataset(tmp_path, {"train": iter([("a.b", np.zeros((4, 4, 3), np.uint8), {})])}, 2, {})


def test_builtin_dataset_is_written_once_with_train_and_heldout(builtin_urls, data_cache):
    train_urls, eval_urls = builtin_urls
    directory = next(data_cache.glob("builtin-photos-*"))
    manifest = read_manifest(directory)
    assert manifest["image_size"] == 32 and manifest["channels"] == 3
    n_train, n_heldout = manifest["splits"]["train"]["samples"], manifest["splits"]["heldout"]["samples"]
    assert n_train > 3000 and 0.05 < n_heldout / (n_train + n_heldout) < 0.15
    first = directory / manifest["splits"]["train"]["shards"][0]["name"]
    mtime = first.stat().st_mtime_ns
    assert ensure_builtin_dataset(data_cache) == builtin_urls
    assert first.stat().st_mtime_ns == mtime  # not rewritten


def _keys(loader):
    return [k for batch in loader for k in batch["key"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_reads_every_heldout_image_once_as_uint8_nchw(builtin_urls, data_cache, num_workers):
    _, eval_urls = builtin_urls
    loader, _ = make_loader(eval_urls, batch_size=16, num_workers=num_workers, train=False)
    batches = list(loader)
    assert all(b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, 32, 32) for b in batches)
    keys = [k for b in batches for k in b["key"]]
    expected = read_manifest(next(data_cache.glob("builtin-photos-*")))["splits"]["heldout"]["samples"]
    assert len(keys) == len(set(keys)) == expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_split_the_shards_without_overlap(builtin_urls, num_workers):
    train_urls, _ = builtin_urls
    everything = set(_keys(make_loader(train_urls, batch_size=32, train=False)[0]))
    per_rank = [set(_keys(make_loader(train_urls, batch_size=32, num_workers=num_workers, rank=r, world_size=2, train=False)[0]))
                for r in range(2)]  # fmt: skip
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == everything


def test_training_order_is_shuffled_per_epoch_and_reproducible(builtin_urls):
    train_urls, _ = builtin_urls

    def epoch_keys(epoch, seed=0):
        loader, dataset = make_loader(train_urls, batch_size=32, seed=seed)
        dataset.set_position(epoch)
        return _keys(loader)

    first = epoch_keys(0)
    assert first == epoch_keys(0)
    assert first != epoch_keys(1) and sorted(first) != first
    assert len(first) == len(set(first)) == len(_keys(make_loader(train_urls, batch_size=32, train=False)[0]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_iterator_resumes_where_it_stopped(builtin_urls, num_workers):
    train_urls, _ = builtin_urls

    def iterator():
        return EpochIterator(*make_loader(train_urls, batch_size=64, num_workers=num_workers, shuffle_buffer=200))

    reference = iterator()
    expected = [next(reference)["key"] for _ in range(70)]  # crosses into the second epoch
    assert reference.epoch == 1

    first = iterator()
    for _ in range(40):
        next(first)
    position = first.state_dict()
    resumed = iterator()
    resumed.load_state_dict(position)
    assert [next(resumed)["key"] for _ in range(30)] == expected[40:]


def test_pixel_statistics_count_grayscale_images_as_rgb_in_a_colour_split(tmp_path):
    """The loader turns a grayscale image into RGB when the dataset is colour, so the statistics
    must count it once in each channel; a grayscale-only split has one channel."""
    colour, gray = _random_samples(3, channels=3), _random_samples(2, channels=1, seed=1)
    manifest = write_dataset(tmp_path / "mixed", {"train": iter(colour + gray)}, 2, {})
    as_rgb = [image for _, image, _ in colour] + [np.repeat(image[..., None], 3, -1) for _, image, _ in gray]
    stats = manifest["splits"]["train"]["pixel_stats"]
    values = np.stack(as_rgb).reshape(-1, 3).astype(np.float64)
    assert np.allclose(stats["mean"], values.mean(0), atol=1e-9)
    assert np.allclose(stats["std"], values.std(0), atol=1e-9)
    assert stats["pixels"] == 5 * 32 * 32

    stats = write_dataset(tmp_path / "gray", {"train": iter(gray)}, 2, {})["splits"]["train"]["pixel_stats"]
    values = np.stack([image for _, image, _ in gray]).astype(np.float64)
    assert stats["mean"] == pytest.approx([values.mean()]) and stats["std"] == pytest.approx([values.std()])


def test_builtin_manifest_holds_the_true_pixel_statistics_of_its_training_images(builtin_urls, data_cache):
    manifest = read_manifest(next(data_cache.glob("builtin-photos-*")))
    loader, _ = make_loader(builtin_urls[0], batch_size=512, train=False, channels=3)
    values = torch.cat([batch["image"] for batch in loader]).permute(1, 0, 2, 3).reshape(3, -1).double()
    stats = manifest["splits"]["train"]["pixel_stats"]
    assert stats["pixels"] == values.shape[1]
    assert np.allclose(stats["mean"], values.mean(1).numpy(), atol=1e-9)
    assert np.allclose(stats["std"], values.std(1, unbiased=False).numpy(), atol=1e-9)
