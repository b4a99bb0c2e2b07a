"""The kill -9 harness, short version (issue #14): 3 kills of a real training process at random
moments, one at least inside a checkpoint write, then the final weights, EMA, optimizer state,
scheduler, step, data position and RNG compared bit for bit with an uninterrupted run.

The long version (20 kills, its result in the README) is the same code:
``python -m tests.kill_harness --kills 20``. The seed is drawn per run and named in any failure;
``KILL_HARNESS_SEED=<seed>`` replays its plan.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.kill_harness import run_harness


@pytest.mark.slow
def test_three_kills_including_one_inside_a_checkpoint_write_resume_bit_identically(tmp_path, data_cache):
    seed = int(os.environ.get("KILL_HARNESS_SEED", random.randrange(1_000_000)))
    result = run_harness(tmp_path, kills=3, seed=seed, data_cache=data_cache, echo=lambda _: None)
    report = f"\n{result.summary()}\nreplay: KILL_HARNESS_SEED={seed} pytest {__file__}"
    assert len(result.kills) >= 3, report
    in_write = [k for k in result.kills if k.landed == "inside a checkpoint write"]
    assert in_write, report
    # The write and step targets come two or more steps into a start: the run after them resumes
    # from a checkpoint, not from scratch.
    assert result.resumes >= 1, report
    assert [c.split(" ")[0] for c in result.compared] == [
        "model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"], report  # fmt: skip
    assert not result.problems, report
    assert not result.differences, report
