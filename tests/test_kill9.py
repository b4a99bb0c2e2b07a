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
import torch

from pipeline.checkpoint import PortableOptimizerState, save_checkpoint
from tests.kill_harness import compare_checkpoints, run_harness


def _checkpoint(root, weights, optimizer_step=3, rng="same", run_dir="a"):
    """A small checkpoint written by the trainer's own save_checkpoint."""
    groups = [{"lr": 1e-3, "params": ["w"]}]
    optimizer = PortableOptimizerState({"w": {"exp_avg": weights["w"] * 2}}, optimizer_step, groups)
    state = {"config": {"train": {"run_dir": run_dir}}, "rng": [{"torch": rng}], "device_seconds": float(len(run_dir))}
    return save_checkpoint(root, 5, weights, optimizer, state, keep_last=1, ema_state=weights)


def test_the_comparison_names_each_difference_down_to_one_bit(tmp_path):
    weights = {"w": torch.linspace(-1, 1, 12).reshape(3, 4), "b": torch.zeros(4)}
    reference = _checkpoint(tmp_path / "a", weights)
    # Another run directory and wall clock are not differences; the same numbers are identical.
    compared, differences = compare_checkpoints(reference, _checkpoint(tmp_path / "b", dict(weights), run_dir="bb"))
    assert differences == [] and len(compared) == 4
    flipped = weights["w"].clone()
    flipped.view(torch.int32)[1, 2] ^= 1  # the lowest bit of one float
    _, differences = compare_checkpoints(
        reference, _checkpoint(tmp_path / "c", {**weights, "w": flipped}, optimizer_step=4, rng="other"))  # fmt: skip
    one_bit = f"{(flipped - weights['w']).abs().max().item():.3g}"
    assert differences == [
        f"model.safetensors: w, largest difference {one_bit}", f"ema.safetensors: w, largest difference {one_bit}",
        f"optimizer.safetensors: exp_avg/w, largest difference {2 * float(one_bit):.3g}",
        "optimizer.safetensors: metadata.rest", "state.json: rng[0].torch",
    ]  # fmt: skip


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
