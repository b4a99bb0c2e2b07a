"""The loader with real shards, real worker processes, real nginx and a real flaky server."""

from __future__ import annotations

import io
import logging
import shutil

import numpy as np
import pytest
import torch

from pipeline.data.loader import EpochIterator, make_loader
from pipeline.data.plan import PlanError
from pipeline.data.shards import write_dataset
from pipeline.data.streams import DataError, StreamOptions
from tests.servers import FlakyServer, Nginx

N_SAMPLES, PER_SHARD = 103, 15  # 7 shards, the last one short: not divisible by 2 ranks x 2 workers


def _images(n, seed=0, size=8):
    rng = np.random.default_rng(seed)
    return [(f"s{i:04d}", rng.integers(0, 256, (size, size, 3), dtype=np.uint8), {"i": i}) for i in range(n)]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_dataset(out, {"train": iter(_images(N_SAMPLES)), "heldout": iter(_images(20, seed=1))}, PER_SHARD, {})
    return out


ALL_KEYS = {f"s{i:04d}" for i in range(N_SAMPLES)}


def one_epoch(iterator: EpochIterator) -> list[list[str]]:
    """The key lists of the batches of the iterator's current epoch."""
    epoch, taken = iterator.epoch, iterator.batches_in_epoch
    if taken == sum(iterator.dataset.batches_per_worker(epoch)):  # finished; the next call starts the next
        epoch, taken = epoch + 1, 0
    n = sum(iterator.dataset.batches_per_worker(epoch)) - taken
    batches = [next(iterator)["key"] for _ in range(n)]
    assert iterator.epoch == epoch
    return batches


def rank_iterator(urls, rank, world_size=2, num_workers=2, batch_size=8, max_skip_fraction=0.05, **kw):
    loader, dataset = make_loader(urls, batch_size=batch_size, num_workers=num_workers, rank=rank,
                                  world_size=world_size, shuffle_buffer=kw.pop("shuffle_buffer", 20), **kw)  # fmt: skip
    return EpochIterator(loader, dataset, max_skip_fraction=max_skip_fraction)


@pytest.mark.parametrize("source", ["pattern", "manifest", "list"])
def test_epoch_mode_two_ranks_two_workers_every_sample_exactly_once(dataset_dir, source):
    pattern = str(dataset_dir / "train-{000000..000006}.tar")
    urls = {"pattern": pattern, "manifest": f"{dataset_dir}/manifest.json#train",
            "list": [str(dataset_dir / f"train-{i:06d}.tar") for i in range(7)]}[source]  # fmt: skip
    for epoch in range(2):
        per_rank = []
        for rank in range(2):
            iterator = rank_iterator(urls, rank)
            iterator.load_state_dict({"epoch": epoch, "batches_in_epoch": 0})
            per_rank.append(one_epoch(iterator))
        assert len(per_rank[0]) == len(per_rank[1]), "ranks must run the same number of batches"
        keys = [k for batches in per_rank for batch in batches for k in batch]
        assert len(keys) == len(set(keys)) == N_SAMPLES and set(keys) == ALL_KEYS
        assert all(0 < len(b) <= 8 for batches in per_rank for b in batches)


def test_a_small_heldout_split_is_shared_evenly_by_every_rank_and_worker(dataset_dir):
    """20 held-out samples in shards of 8: three ranks x two workers each read an equal run of
    them (shards cut where needed), every sample exactly once. Dealt as whole shards, a rank
    would get none, and the equal-batches rule of training would refuse to start."""
    urls = f"{dataset_dir}/manifest.json#heldout"
    per_rank = []
    for rank in range(3):
        loader, _ = make_loader(urls, batch_size=4, train=False, num_workers=2, rank=rank, world_size=3)
        per_rank.append([key for batch in loader for key in batch["key"]])
    assert sorted(k for keys in per_rank for k in keys) == sorted(f"s{i:04d}" for i in range(20))
    assert sorted(len(keys) for keys in per_rank) == [6, 7, 7]


def test_shard_order_and_samples_are_reshuffled_every_epoch(dataset_dir):
    iterator = rank_iterator(f"{dataset_dir}/manifest.json#train", rank=0, world_size=1)
    first, second = one_epoch(iterator), one_epoch(iterator)
    flat = lambda batches: [k for b in batches for k in b]  # noqa: E731
    assert sorted(flat(first)) == sorted(flat(second)) == sorted(ALL_KEYS)
    assert flat(first) != flat(second)
    again = rank_iterator(f"{dataset_dir}/manifest.json#train", rank=0, world_size=1)
    assert one_epoch(again) == first  # the same seed gives the same order


def test_too_few_shards_for_the_processes_is_a_clear_error(dataset_dir):
    with pytest.raises(PlanError, match="too few or too uneven"):
        rank_iterator(str(dataset_dir / "train-000000.tar"), rank=0, world_size=2, num_workers=0).dataset.batches_per_worker(0)


def test_resampled_mode_draws_an_endless_seeded_stream(dataset_dir):
    urls = f"{dataset_dir}/manifest.json#train"
    per_rank = []
    for rank in range(2):
        iterator = rank_iterator(urls, rank, mode="resampled", epoch_batches=5)
        batches = [next(iterator)["key"] for _ in range(12)]  # more than two epochs
        assert iterator.epoch == 2 and iterator.batches_in_epoch == 2
        assert all(len(b) == 8 for b in batches) and set(k for b in batches for k in b) <= ALL_KEYS
        per_rank.append(batches)
    assert per_rank[0] != per_rank[1]  # each rank draws its own shards
    again = rank_iterator(urls, 0, mode="resampled", epoch_batches=5)
    assert [next(again)["key"] for _ in range(12)] == per_rank[0]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_at", [1, 6, 9])  # inside the first epoch, at its end, in the second
def test_resume_mid_epoch_gives_the_same_keys_without_decoding_the_past(dataset_dir, num_workers, stop_at):
    urls = f"{dataset_dir}/manifest.json#train"
    reference = rank_iterator(urls, rank=1, num_workers=num_workers, hflip=True)
    expected = [next(reference) for _ in range(stop_at + 5)]

    interrupted = rank_iterator(urls, rank=1, num_workers=num_workers, hflip=True)
    for _ in range(stop_at):
        next(interrupted)
    resumed = rank_iterator(urls, rank=1, num_workers=num_workers, hflip=True)
    resumed.load_state_dict(interrupted.state_dict())
    got = [next(resumed) for _ in range(5)]
    assert [b["key"] for b in got] == [b["key"] for b in expected[stop_at:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, expected[stop_at:]))  # flips too
    if resumed.epoch == 0:
        counts = resumed.counts()
        consumed = sum(len(b["key"]) for b in expected[:stop_at])
        assert counts["not_decoded"] == consumed  # passed over, never decoded
        assert counts["decoded"] == sum(len(b["key"]) for b in got) or num_workers  # workers decode ahead


def test_resume_skips_whole_shards_it_no_longer_needs(dataset_dir):
    urls = f"{dataset_dir}/manifest.json#train"
    reference = rank_iterator(urls, rank=0, world_size=1, num_workers=0, shuffle_buffer=4)
    n = sum(reference.dataset.batches_per_worker(0))
    resumed = rank_iterator(urls, rank=0, world_size=1, num_workers=0, shuffle_buffer=4)
    resumed.load_state_dict({"epoch": 0, "batches_in_epoch": n - 1})
    next(resumed)
    counts = resumed.counts()
    assert counts["shards_skipped"] >= 5 and counts["shards_opened"] <= 2
    assert counts["decoded"] <= 8


def test_hflip_mirrors_some_images(dataset_dir):
    urls = f"{dataset_dir}/manifest.json#train"
    plain = {k: img for b in one_epoch(_with_images(rank_iterator(urls, 0, world_size=1, num_workers=0))) for k, img in b}
    flipped = {k: img for b in one_epoch(_with_images(rank_iterator(urls, 0, world_size=1, num_workers=0, hflip=True)))
               for k, img in b}  # fmt: skip
    mirrored = sum(torch.equal(flipped[k], plain[k].flip(-1)) for k in plain)
    unchanged = sum(torch.equal(flipped[k], plain[k]) for k in plain)
    assert mirrored + unchanged == N_SAMPLES and 20 < mirrored < N_SAMPLES - 20


def test_an_image_of_another_size_is_skipped_and_the_rest_keep_their_keys(tmp_path):
    samples = _images(20)
    samples[5] = ("s0005", np.zeros((10, 10, 3), dtype=np.uint8), {})  # every other image is 8x8
    write_dataset(tmp_path, {"train": iter(samples)}, 10, {})
    iterator = rank_iterator(f"{tmp_path}/manifest.json#train", 0, world_size=1, num_workers=0, hflip=True)
    pairs = {k: img for b in one_epoch(_with_images(iterator)) for k, img in b}
    assert set(pairs) == {key for key, _, _ in samples} - {"s0005"}
    truth = {key: torch.from_numpy(image).permute(2, 0, 1) for key, image, _ in samples}
    assert all(torch.equal(img, truth[k]) or torch.equal(img, truth[k].flip(-1)) for k, img in pairs.items())
    assert iterator.counts()["corrupt"] == 1


class _with_images:
    """Adapts an EpochIterator to yield (key, image) pairs per batch, for one_epoch."""

    def __init__(self, iterator):
        self.iterator, self.dataset = iterator, iterator.dataset

    @property
    def epoch(self):
        return self.iterator.epoch

    @property
    def batches_in_epoch(self):
        return self.iterator.batches_in_epoch

    def __next__(self):
        batch = next(self.iterator)
        return {"key": list(zip(batch["key"], batch["image"]))}


# --- faults ---------------------------------------------------------------------------------


@pytest.fixture()
def broken_dir(tmp_path):
    """Seven shards with one fault of each kind the loader must survive."""
    write_dataset(tmp_path, {"train": iter(_images(N_SAMPLES))}, PER_SHARD, {})
    _rewrite_member(tmp_path / "train-000001.tar", "s0017.png", b"this is not a png")  # corrupt image
    _rewrite_member(tmp_path / "train-000002.tar", "s0031.png", b"")  # zero-byte member
    data = (tmp_path / "train-000003.tar").read_bytes()
    (tmp_path / "train-000003.tar").write_bytes(data[: len(data) // 2])  # truncated tar
    (tmp_path / "train-000004.tar").unlink()  # missing shard
    return tmp_path


def _rewrite_member(path, name, payload):
    import tarfile

    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append((m, payload if m.name == name else tar.extractfile(m).read()))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_faults_are_skipped_named_and_counted(broken_dir, caplog):
    iterator = rank_iterator(f"{broken_dir}/manifest.json#train", rank=0, world_size=1, num_workers=0,
                             max_skip_fraction=1.0)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        keys = [k for b in one_epoch(iterator) for k in b]
    counts = iterator.counts()
    assert counts["corrupt"] == 2  # the garbage image and the zero-byte member
    truncated_lost = 15 - sum(k in {f"s{i:04d}" for i in range(45, 60)} for k in keys)
    assert truncated_lost > 0
    assert counts["missing"] == 15 + truncated_lost  # the missing shard, the truncated rest
    assert len(keys) == len(set(keys)) == N_SAMPLES - counts["corrupt"] - counts["missing"]
    log = caplog.text
    assert "s0017" in log and "train-000001.tar" in log
    assert "s0031" in log and "train-000002.tar" in log
    assert "train-000003.tar" in log and "train-000004.tar" in log


def test_too_many_faults_stop_the_run_with_a_clear_error(broken_dir):
    loader, dataset = make_loader(f"{broken_dir}/manifest.json#train", batch_size=8, shuffle_buffer=20)
    iterator = EpochIterator(loader, dataset, max_skip_fraction=0.1)
    with pytest.raises(DataError, match=r"could not be read .* more than data.max_skip_fraction=0.1"):
        one_epoch(iterator)


def test_pipe_urls_are_refused_unless_allowed(dataset_dir):
    url = f"pipe:cat {dataset_dir}/train-{{000000..000006}}.tar"
    with pytest.raises(DataError, match="allow_pipe"):
        make_loader(url, batch_size=8)
    shards = [f"pipe:cat {dataset_dir}/train-{i:06d}.tar" for i in range(7)]
    loader, _ = make_loader(shards, batch_size=8, mode="resampled", epoch_batches=3,
                            options=StreamOptions(allow_pipe=True))  # fmt: skip
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == 24 and set(keys) <= ALL_KEYS


def test_a_failing_pipe_command_is_retried_then_counted(dataset_dir, tmp_path):
    # Only the manifest's counts make epoch mode possible; give pipe shards counts by hand.
    from pipeline.data.plan import Shard

    good = [Shard(f"pipe:cat {dataset_dir}/train-{i:06d}.tar", PER_SHARD) for i in range(6)]
    bad = Shard("pipe:cat /nonexistent/shard.tar", 13)
    loader, dataset = make_loader(good + [bad], batch_size=8, options=StreamOptions(allow_pipe=True, retries=2, backoff=0.01))
    iterator = EpochIterator(loader, dataset, max_skip_fraction=0.5)
    keys = [k for b in one_epoch(iterator) for k in b]
    assert len(keys) == 90 and iterator.counts()["missing"] == 13 and iterator.counts()["retries"] == 2


# --- over HTTP ---------------------------------------------------------------------------------

needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None and not __import__("os").path.exists("/usr/sbin/nginx"),
    reason="nginx is not installed (make test installs it from Debian when run as root)",
)


@needs_nginx
def test_shards_over_http_from_nginx_two_ranks_two_workers(dataset_dir, tmp_path):
    with Nginx(dataset_dir, tmp_path / "nginx") as nginx:
        for urls in (f"{nginx.url}/manifest.json#train", f"{nginx.url}/train-{{000000..000006}}.tar"):
            per_rank = [one_epoch(rank_iterator(urls, rank)) for rank in range(2)]
            keys = [k for batches in per_rank for b in batches for k in b]
            assert len(per_rank[0]) == len(per_rank[1])
            assert len(keys) == len(set(keys)) == N_SAMPLES and set(keys) == ALL_KEYS


@needs_nginx
def test_an_http_error_is_retried_then_counted(dataset_dir, tmp_path):
    with Nginx(dataset_dir, tmp_path / "nginx", errors={"/train-000002.tar": 503}) as nginx:
        loader, dataset = make_loader(f"{nginx.url}/manifest.json#train", batch_size=8,
                                      options=StreamOptions(retries=2, backoff=0.01))  # fmt: skip
        iterator = EpochIterator(loader, dataset, max_skip_fraction=0.5)
        keys = [k for b in one_epoch(iterator) for k in b]
    counts = iterator.counts()
    assert counts["retries"] == 2 and counts["missing"] == PER_SHARD
    assert set(keys) == ALL_KEYS - {f"s{i:04d}" for i in range(30, 45)}


def test_a_connection_dropped_mid_shard_is_resumed_by_a_retry(dataset_dir):
    with FlakyServer(dataset_dir, drops={"/train-000003.tar": 2}) as server:
        loader, dataset = make_loader(f"{server.url}/manifest.json#train", batch_size=8, num_workers=2,
                                      options=StreamOptions(retries=3, backoff=0.01))  # fmt: skip
        iterator = EpochIterator(loader, dataset)
        keys = [k for b in one_epoch(iterator) for k in b]
    assert len(keys) == len(set(keys)) == N_SAMPLES  # nothing lost, nothing twice
    assert iterator.counts()["retries"] == 2 and iterator.counts()["missing"] == 0
    assert server.requests.count("/train-000003.tar") == 3


def test_a_connection_that_always_drops_loses_only_the_unread_rest(dataset_dir):
    with FlakyServer(dataset_dir, drops={"/train-000003.tar": -1}) as server:
        loader, dataset = make_loader(f"{server.url}/manifest.json#train", batch_size=8,
                                      options=StreamOptions(retries=1, backoff=0.01))  # fmt: skip
        iterator = EpochIterator(loader, dataset, max_skip_fraction=0.5)
        keys = [k for b in one_epoch(iterator) for k in b]
    missing = iterator.counts()["missing"]
    assert 0 < missing < PER_SHARD and len(keys) == len(set(keys)) == N_SAMPLES - missing
