"""A run resumed under another layout (processes, workers, batch size) continues the same epoch
with exactly the samples not yet seen. Ranks are simulated by one EpochIterator each, in turn."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from pipeline.data.plan import Layout, PlanError, Shard, batches_taken, epoch_plan, unconsumed
from pipeline.data.shards import write_dataset
from pipeline.data.streams import StreamOptions
from tests.test_loader import ALL_KEYS, N_SAMPLES, PER_SHARD, _images, one_epoch, rank_iterator


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_dataset(out, {"train": iter(_images(N_SAMPLES))}, PER_SHARD, {})
    return f"{out}/manifest.json#train"


def stint(urls, world_size, num_workers, batch_size, batches, states=None, **kw):
    """One layout's ranks, each resumed from ``states`` (the previous stint's) when given, taking
    ``batches`` batches (None: the rest of the epoch). Their keys, states (through JSON, as in a
    checkpoint) and iterators."""
    iterators = [rank_iterator(urls, r, world_size=world_size, num_workers=num_workers, batch_size=batch_size, **kw)
                 for r in range(world_size)]  # fmt: skip
    keys, left = [], []
    for iterator in iterators:
        if states is not None:
            iterator.resume(states)
        epoch = iterator.epoch
        left.append(sum(iterator.dataset.batches_per_worker(epoch)) - iterator.batches_in_epoch)
        keys += [k for _ in range(left[-1] if batches is None else batches) for k in next(iterator)["key"]]
        assert iterator.epoch == epoch
    assert len(set(left)) == 1, f"ranks must run the same number of batches: {left}"
    return keys, [json.loads(json.dumps(i.state_dict())) for i in iterators], iterators


def assert_exactly_once(keys):
    assert len(keys) == len(set(keys)) and set(keys) == ALL_KEYS


def assert_next_epoch_is_an_ordinary_one(urls, iterators, **layout):
    for rank, iterator in enumerate(iterators):
        fresh = rank_iterator(urls, rank, world_size=len(iterators), **layout)
        fresh.load_state_dict({"epoch": 1, "batches_in_epoch": 0})
        assert one_epoch(iterator) == one_epoch(fresh)
        assert iterator.state_dict()["earlier"] == []


# (world size, batch size, batches taken; None: to the end of the epoch) per stint
CHAINS = {
    "2 -> 1": [(2, 8, 3), (1, 8, None)],
    "1 -> 2": [(1, 8, 5), (2, 8, None)],
    "2 -> 1 -> 2": [(2, 8, 2), (1, 8, 3), (2, 8, None)],
    "2 -> 1 -> 2, other batch sizes": [(2, 8, 2), (1, 5, 3), (2, 6, None)],
}


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("chain", list(CHAINS))
def test_a_changed_layout_sees_the_rest_of_the_epoch_exactly_once(urls, chain, num_workers):
    keys, states = [], None
    for world_size, batch_size, batches in CHAINS[chain]:
        taken, states, iterators = stint(urls, world_size, num_workers, batch_size, batches, states)
        keys += taken
    assert_exactly_once(keys)
    assert_next_epoch_is_an_ordinary_one(urls, iterators, num_workers=num_workers, batch_size=CHAINS[chain][-1][1])


def test_workers_and_batch_size_may_change_too(urls):
    keys, states = [], None
    for world_size, num_workers, batch_size, batches in [(2, 2, 8, 2), (1, 0, 5, 4), (1, 2, 7, 2), (2, 0, 6, None)]:
        taken, states, iterators = stint(urls, world_size, num_workers, batch_size, batches, states)
        keys += taken
    assert_exactly_once(keys)
    assert len(json.dumps(states[0])) < 1000  # layouts and counts, never sample lists


def test_streamed_shards_continue_exactly_too(urls):
    root = urls.rsplit("/", 1)[0]
    shards = [Shard(f"pipe:cat {root}/train-{i:06d}.tar", min(PER_SHARD, N_SAMPLES - i * PER_SHARD)) for i in range(7)]
    options = StreamOptions(allow_pipe=True)
    keys, states = [], None
    for world_size, num_workers, batch_size, batches in [(2, 2, 8, 2), (1, 2, 8, 3), (2, 0, 8, None)]:
        taken, states, _ = stint(shards, world_size, num_workers, batch_size, batches, states, options=options)
        keys += taken
    assert_exactly_once(keys)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_continued_epoch_resumed_under_its_own_layout_gives_the_same_batches(urls, num_workers):
    _, states, _ = stint(urls, 2, 2, 8, 2)
    _, _, (reference,) = stint(urls, 1, num_workers, 8, 0, states)
    expected = [next(reference) for _ in range(6)]
    _, saved, _ = stint(urls, 1, num_workers, 8, 2, states)
    assert saved[0]["earlier"] == [
        {"world_size": 2, "num_workers": 2, "batch_size": 8, "seed": 0, "shuffle_buffer": 20, "batches": [2, 2]}
    ]
    resumed = rank_iterator(urls, 0, world_size=1, num_workers=num_workers)
    resumed.resume(saved)
    got = [next(resumed) for _ in range(4)]
    assert [b["key"] for b in got] == [b["key"] for b in expected[2:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, expected[2:]))


def test_the_same_layout_resumes_as_load_state_dict(urls):
    reference = rank_iterator(urls, 1, hflip=True)
    expected = [next(reference)["key"] for _ in range(8)]
    _, states, _ = stint(urls, 2, 2, 8, 3, hflip=True)
    resumed = rank_iterator(urls, 1, hflip=True)
    resumed.resume(states)
    assert resumed.state_dict() == states[1]
    assert [next(resumed)["key"] for _ in range(5)] == expected[3:]


def test_consumed_shards_are_not_opened_and_consumed_samples_not_decoded(urls):
    first, states, _ = stint(urls, 1, 0, 8, 10, shuffle_buffer=4)
    left = set(ALL_KEYS) - set(first)
    shards_left = {int(k[1:]) // PER_SHARD for k in left}
    assert len(shards_left) < 7
    rest, _, iterators = stint(urls, 2, 0, 8, None, states, shuffle_buffer=4)
    assert set(rest) == left
    counts = [i.counts() for i in iterators]
    assert sum(c["decoded"] for c in counts) == len(left) and sum(c["not_decoded"] for c in counts) == 0
    # Each run of the 2 ranks may split one shard: opened by both.
    assert sum(c["shards_opened"] for c in counts) <= len(shards_left) + 1


def test_old_states_load_as_before_or_start_the_next_epoch(urls, caplog):
    _, states, _ = stint(urls, 2, 2, 8, 3)
    old = [{"epoch": s["epoch"], "batches_in_epoch": s["batches_in_epoch"]} for s in states]
    same = rank_iterator(urls, 1)
    same.resume(old)
    assert (same.epoch, same.batches_in_epoch) == (0, 3)
    other = rank_iterator(urls, 0, world_size=1)
    with caplog.at_level(logging.WARNING):
        other.resume(old)
    assert (other.epoch, other.batches_in_epoch) == (1, 0)
    assert "restarts at epoch 1" in caplog.text


def test_resampled_mode_under_another_layout_starts_the_next_epoch(urls, caplog):
    _, states, _ = stint(urls, 2, 0, 8, 3, mode="resampled", epoch_batches=5)
    other = rank_iterator(urls, 0, world_size=1, num_workers=0, mode="resampled", epoch_batches=5)
    with caplog.at_level(logging.WARNING):
        other.resume(states)
    assert (other.epoch, other.batches_in_epoch) == (1, 0) and "resampled mode" in caplog.text
    assert len(next(other)["key"]) == 8


def test_epoch_boundaries_under_another_layout(urls, caplog):
    # Saved before the epoch's first batch: the new layout's ordinary epoch.
    _, states, _ = stint(urls, 2, 0, 8, 0)
    resumed = rank_iterator(urls, 0, world_size=1, num_workers=0)
    resumed.resume(states)
    fresh = rank_iterator(urls, 0, world_size=1, num_workers=0)
    assert one_epoch(resumed) == one_epoch(fresh)
    # Saved after its last batch: the next epoch, nothing skipped, nothing to warn about.
    _, states, _ = stint(urls, 2, 0, 8, None)
    with caplog.at_level(logging.WARNING):
        resumed.resume(states)
    assert (resumed.epoch, resumed.batches_in_epoch, resumed.earlier) == (1, 0, []) and not caplog.text


def test_a_rest_too_small_for_the_new_layout_starts_the_next_epoch(urls, caplog):
    # One sample left cannot give two ranks a batch each: nothing else can be done.
    state = {"epoch": 0, "batches_in_epoch": N_SAMPLES - 1, "rank": 0, "world_size": 1, "num_workers": 1,
             "batch_size": 1, "seed": 0, "shuffle_buffer": 20, "earlier": []}  # fmt: skip
    resumed = rank_iterator(urls, 1, world_size=2, num_workers=0)
    with caplog.at_level(logging.WARNING):
        resumed.resume([state])
    assert (resumed.epoch, resumed.batches_in_epoch) == (1, 0) and "cannot be dealt" in caplog.text


@pytest.mark.parametrize("trial", range(20))
def test_the_plan_deals_every_sample_once_through_any_chain_of_layouts(trial):
    """The arithmetic alone, on random shard sizes and random chains of layouts."""
    rng = np.random.default_rng(trial)
    shards = [Shard(f"s{i}", int(rng.integers(1, 40))) for i in range(int(rng.integers(4, 30)))]
    total = sum(s.samples for s in shards)
    seen = np.zeros(total, dtype=int)
    starts = np.cumsum([0] + [s.samples for s in shards])
    earlier = []
    for _ in range(200):
        layout = Layout(int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(2, 9)), trial, 8)
        remaining = unconsumed(shards, epoch=3, shuffle=True, earlier=earlier) if earlier else None
        if remaining is not None and not remaining.any():
            break
        try:
            plans = [epoch_plan(shards, epoch=3, rank=r, shuffle=True, hflip=False, order_for=range(layout.num_workers),
                                remaining=remaining, continuation=len(earlier), **dataclasses.asdict(layout))
                     for r in range(layout.world_size)]  # fmt: skip
        except PlanError:  # too little left for this layout: try another
            continue
        per_rank = [sum(len(p.batch_sizes) for p in rank_plans) for rank_plans in plans]
        assert len(set(per_rank)) == 1
        taken = int(rng.integers(0, per_rank[0] + 1))
        for rank_plans in plans:
            for plan, n in zip(rank_plans, batches_taken([len(p.batch_sizes) for p in rank_plans], taken)):
                ids = np.concatenate([starts[p.number] + p.sample_indices() for p in plan.parts] + [np.zeros(0, int)])
                seen[ids[plan.order[: sum(plan.batch_sizes[:n])]]] += 1
        earlier.append((layout, [taken] * layout.world_size))
        assert (seen <= 1).all() and ((seen == 0) == unconsumed(shards, epoch=3, shuffle=True, earlier=earlier)).all()
    assert (seen == 1).all()
