"""The update decision (pipeline/updates.py) with a real Accelerator and a real dynamic loss scaler.

Accelerate creates its fp16 GradScaler only on a GPU; here the same torch class runs on the CPU,
set where Accelerate keeps it before `prepare`, so backward, unscaling, clipping and the
scaler's skip are the real code paths of fp16 training.
"""

import pytest
import torch
from accelerate import Accelerator

from pipeline.config import load_config
from pipeline.updates import TrainingDiverged, TrainingStalled, UpdateGuard


def _setup(*overrides, init_scale=None):
    accelerator = Accelerator(cpu=True)
    if init_scale is not None:
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    guard = UpdateGuard(accelerator, scheduler, load_config(None, list(overrides)))
    return accelerator, model, optimizer, scheduler, guard


def _step(accelerator, model, optimizer, guard, scale=1.0):
    loss = model(torch.full((2, 4), scale)).pow(2).mean()
    accelerator.backward(loss)
    return guard.step(model, optimizer)


def test_fp16_overflows_are_dropped_counted_apart_and_never_stall_the_run():
    # A loss scale of 2^100 overflows float32 gradients: every step is an overflow until the
    # scaler has halved its way down, and a stall guard of 2 must not mistake that for divergence.
    accelerator, model, optimizer, scheduler, guard = _setup("objective.max_consecutive_skips=2", init_scale=2.0**100)
    before = model.weight.detach().clone()
    outcomes = [_step(accelerator, model, optimizer, guard, scale=1e6)[1] for _ in range(4)]
    assert outcomes == ["overflow"] * 4
    assert guard.overflows == 4 and guard.skipped == 0 and guard.consecutive_skips == 0
    assert torch.equal(model.weight, before), "an overflow step must leave the weights alone"
    assert accelerator.scaler.get_scale() == 2.0**96  # halved once per overflow
    assert scheduler.last_epoch == 0  # the schedule did not advance


def test_with_a_sane_scale_the_update_happens():
    accelerator, model, optimizer, scheduler, guard = _setup(init_scale=2.0**8)
    before = model.weight.detach().clone()
    norm, outcome = _step(accelerator, model, optimizer, guard)
    assert outcome == "stepped" and torch.isfinite(norm) and not torch.equal(model.weight, before)
    assert guard.overflows == 0 and scheduler.last_epoch == 1


def test_a_large_finite_norm_is_a_skip_even_under_a_scaler_and_the_scaler_goes_on():
    accelerator, model, optimizer, scheduler, guard = _setup("objective.skip_threshold=1e-3", init_scale=2.0**8)
    before = model.weight.detach().clone()
    assert _step(accelerator, model, optimizer, guard, scale=100.0)[1] == "skipped"
    assert guard.skipped == 1 and guard.overflows == 0 and torch.equal(model.weight, before)
    # The scaler's step was closed: the next unscale works (torch raises if it was left open).
    assert _step(accelerator, model, optimizer, guard, scale=100.0)[1] == "skipped"


def test_skips_in_a_row_stop_the_run():
    accelerator, model, optimizer, _, guard = _setup("objective.skip_threshold=1e-6", "objective.max_consecutive_skips=3")
    _step(accelerator, model, optimizer, guard)
    _step(accelerator, model, optimizer, guard)
    with pytest.raises(TrainingStalled, match="last 3 updates were all skipped"):
        _step(accelerator, model, optimizer, guard)


def _nan_step(accelerator, model, optimizer, guard):
    loss = model(torch.ones(2, 4)).pow(2).mean() * float("nan")
    accelerator.backward(loss)
    return guard.step(model, optimizer)


def test_a_nonfinite_norm_is_a_skip_counted_apart_and_only_a_run_of_them_makes_a_rollback_due():
    accelerator, model, optimizer, scheduler, guard = _setup(
        "objective.skip_threshold=50", "train.rollback_after_nonfinite=2", "objective.max_consecutive_skips=5")
    _step(accelerator, model, optimizer, guard)  # one applied update: AdamW has its state
    before = model.weight.detach().clone()
    adam = {k: v.clone() for k, v in optimizer.state[optimizer.param_groups[0]["params"][0]].items()}
    norm, outcome = _nan_step(accelerator, model, optimizer, guard)
    assert outcome == "skipped" and torch.isnan(norm) and not guard.rollback_due and guard.diverging
    assert torch.equal(model.weight, before) and scheduler.last_epoch == 1
    after = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert all(torch.equal(after[k], adam[k]) for k in adam) and after["step"].item() == 1
    # A skip for a large finite norm ends the run of non-finite ones (the stall guard counts both).
    assert _step(accelerator, model, optimizer, guard, scale=1e3)[1] == "skipped"
    assert (guard.skipped, guard.nonfinite, guard.consecutive_nonfinite, guard.consecutive_skips) == (2, 1, 0, 2)
    _nan_step(accelerator, model, optimizer, guard)
    assert not guard.rollback_due
    _nan_step(accelerator, model, optimizer, guard)
    assert guard.rollback_due and guard.nonfinite == 3


def test_a_rollback_goes_back_before_the_run_and_one_more_than_allowed_is_an_error():
    accelerator, model, optimizer, _, guard = _setup("train.rollback_after_nonfinite=2", "train.max_rollbacks=1")
    for _ in range(2):
        _nan_step(accelerator, model, optimizer, guard)
    assert guard.begin_rollback(step=9) == 7  # steps 8 and 9 were non-finite: a checkpoint of 7 or before
    assert (guard.rollbacks, guard.consecutive_nonfinite, guard.consecutive_skips) == (1, 0, 0)
    assert not guard.rollback_due and not guard.diverging
    for _ in range(2):
        _nan_step(accelerator, model, optimizer, guard)
    with pytest.raises(TrainingDiverged, match=r"up to step 12, after 1 rollback\(s\) already \(train.max_rollbacks=1\)"):
        guard.begin_rollback(step=12)
    assert isinstance(TrainingDiverged("x"), TrainingStalled)  # train.py's exit 4


def test_under_fp16_a_nonfinite_norm_is_the_scalers_overflow_and_never_a_rollback():
    accelerator, model, optimizer, _, guard = _setup("train.rollback_after_nonfinite=2", init_scale=2.0**8)
    outcomes = [_nan_step(accelerator, model, optimizer, guard)[1] for _ in range(3)]
    assert outcomes == ["overflow"] * 3 and guard.nonfinite == 0 and not guard.rollback_due
