"""Batches handed from real worker processes to the training process through reused slots of
shared memory: every batch must hold the pixels of its own keys, however the slots are reused."""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pytest
import torch
from torch.utils.data._utils import MP_STATUS_CHECK_INTERVAL

from pipeline.data import handoff
from pipeline.data.loader import EpochIterator, make_loader
from pipeline.data.shards import write_dataset

N_SAMPLES, PER_SHARD, BATCH = 103, 15, 8


def _images(n: int) -> list[tuple[str, np.ndarray, dict]]:
    rng = np.random.default_rng(3)
    return [(f"s{i:04d}", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), {}) for i in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("handoff")
    write_dataset(out, {"train": iter(_images(N_SAMPLES))}, PER_SHARD, {})
    return f"{out}/manifest.json#train"


TRUTH = {key: torch.from_numpy(image).permute(2, 0, 1) for key, image, _ in _images(N_SAMPLES)}


def _assert_true_pixels(batches: list[dict]) -> None:
    for batch in batches:
        assert batch["image"].shape == (len(batch["key"]), 3, 8, 8)
        for key, image in zip(batch["key"], batch["image"]):
            assert torch.equal(image, TRUTH[key]), f"batch {batch['worker']}/{batch['index']}: wrong pixels for {key}"


@pytest.mark.parametrize(
    "slots, message_bytes, slot_max_bytes",
    [
        (1, 1, handoff.SLOT_MAX_BYTES),  # one batch per message, one slot: every batch waits for the last's copy
        (2, 3 * BATCH * 3 * 8 * 8, handoff.SLOT_MAX_BYTES),  # three batches per message, slots reused
        (2, handoff.MESSAGE_BYTES, 1),  # every batch too big for a slot: its own segment
    ],
    ids=["one-slot", "three-per-message", "too-big-for-slots"],
)
def test_every_batch_holds_the_pixels_of_its_keys(shards, monkeypatch, slots, message_bytes, slot_max_bytes):
    # The workers are forked when the epoch starts, so they run with these settings.
    monkeypatch.setattr(handoff, "SLOTS", slots)
    monkeypatch.setattr(handoff, "MESSAGE_BYTES", message_bytes)
    monkeypatch.setattr(handoff, "SLOT_MAX_BYTES", slot_max_bytes)
    loader, dataset = make_loader(shards, batch_size=BATCH, num_workers=2, shuffle_buffer=20, hflip=False)
    iterator = EpochIterator(loader, dataset)
    per_epoch = sum(dataset.batches_per_worker(0))
    assert per_epoch > 2 * 2 * slots  # each worker sends more messages than it has slots: slots are reused
    held = [next(iterator) for _ in range(2 * per_epoch)]  # all kept: a reused slot must not show through
    _assert_true_pixels(held)
    for epoch in range(2):
        keys = [k for b in held[epoch * per_epoch : (epoch + 1) * per_epoch] for k in b["key"]]
        assert sorted(keys) == sorted(TRUTH)


def test_an_iterator_dropped_mid_epoch_lets_its_workers_go(shards, monkeypatch):
    monkeypatch.setattr(handoff, "SLOTS", 1)
    monkeypatch.setattr(handoff, "MESSAGE_BYTES", 1)
    loader, dataset = make_loader(shards, batch_size=BATCH, num_workers=2, shuffle_buffer=20)
    iterator = EpochIterator(loader, dataset)
    first = next(iterator)
    time.sleep(0.5)  # both workers now wait for their only slot
    workers = multiprocessing.active_children()  # the loader's two workers
    assert len(workers) == 2
    start = time.monotonic()
    iterator.load_state_dict({"epoch": 0, "batches_in_epoch": 1})  # drops the iterator, as a resume does
    # Freed from waiting, the workers end at once; torch would otherwise wait out its 5 s join
    # timeout for each stuck worker (10 s here) before going on.
    assert time.monotonic() - start < MP_STATUS_CHECK_INTERVAL
    assert not any(worker.is_alive() for worker in workers)
    second = next(iterator)
    assert second["key"] != first["key"]
    _assert_true_pixels([first, second])


def test_a_dataloader_used_directly_gets_plain_batches(shards):
    loader, _ = make_loader(shards, batch_size=BATCH, num_workers=2, train=False)
    batches = list(loader)
    assert all("slot" not in b and "batches" not in b for b in batches)
    _assert_true_pixels(batches)
    assert sorted(k for b in batches for k in b["key"]) == sorted(TRUTH)
