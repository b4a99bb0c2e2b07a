"""Issue #14, the NaN/Inf criterion: a non-finite loss or gradient made on purpose at chosen steps
(``faults.*``) is skipped on every rank with the weights, the optimizer state and the EMA bitwise
unchanged, and counted; K of them in a row roll the run back to the last checkpoint before them,
the data moving on; one rollback more than ``train.max_rollbacks`` stops the run with exit 4 and
its newest checkpoint intact. Tiny model, a few steps, real processes where the launch matters."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from accelerate import Accelerator
from mlflow import MlflowClient
from safetensors.torch import load_file

from pipeline.checkpoint import list_checkpoints, load_checkpoint, load_ema, torch_from_portable, verify_checkpoint
from pipeline.config import ConfigError, load_config
from pipeline.distributed import make_accelerator
from pipeline.trainer import Trainer
from pipeline.updates import TrainingDiverged
from tests.conftest import REPO, TINY_MODEL

# What every run here shares: nothing evaluated or drawn but what the end of a run needs.
QUIET = ("train.eval_at_start=false", "train.diagnostics=false", "train.final_iw_samples=0", "train.eval_batches=1",
         "optim.schedule=constant", "checkpoint.keep_last=10")  # fmt: skip


@pytest.mark.parametrize("overrides, message", [
    (["train.rollback_after_nonfinite=50"], "must be below objective.max_consecutive_skips=50"),
    (["train.max_rollbacks=-1"], "train.max_rollbacks: must be >= 0"),
    (["faults.inject_nonfinite_steps=[0, 3]"], "faults.inject_nonfinite_steps: steps count from 1"),
    (["faults.inject_ranks=[-1]"], "faults.inject_ranks: ranks count from 0"),
    (["faults.inject_nonfinite_steps=[3]", "faults.inject_ranks=[]"], "would inject nothing"),
    (["faults.inject_into=weights"], "'loss', 'gradient'"),
])  # fmt: skip
def test_the_rollback_knobs_and_the_fault_hook_are_checked_at_start(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)
    assert load_config(None, []).faults.inject_nonfinite_steps == []  # off unless asked


def test_rollback_is_refused_under_deepspeed_at_start(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="train.rollback_after_nonfinite > 0 under DeepSpeed"):
        make_accelerator(load_config(None, ["train.rollback_after_nonfinite=2"]))


def _checkpoint(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:06d}"


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {different[:3]} differ"


def _assert_same_training_state(before, after):
    """Weights, EMA, AdamW's moments and step counter, the schedule: bit for bit."""
    for name in ("model.safetensors", "ema.safetensors"):
        _assert_bitwise_equal(load_file(before / name), load_file(after / name), name)
    _, opt_before, state_before = load_checkpoint(before)
    _, opt_after, state_after = load_checkpoint(after)
    assert opt_after.step == opt_before.step  # AdamW's step counter did not advance
    for name, moments in opt_before.tensors.items():
        _assert_bitwise_equal(moments, opt_after.tensors[name], f"optimizer state of {name}")
    assert state_after["scheduler"] == state_before["scheduler"]  # the schedule did not advance either
    return state_before, state_after


def _metrics(run_dir):
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run


@pytest.mark.slow
def test_two_ddp_processes_both_skip_a_gradient_made_infinite_on_rank_1_only(tmp_path, launch):
    run_dir = tmp_path / "ddp"
    result = launch(run_dir, *QUIET, "train.steps=3", "checkpoint.every=1", "data.batch_size=4",
                    "faults.inject_nonfinite_steps=[2]", "faults.inject_ranks=[1]", "faults.inject_into=gradient",
                    "faults.inject_value=inf", accelerate_config="cpu_ddp", num_processes=2)  # fmt: skip
    assert "making the gradient non-finite (inf) on rank 1" in result.stderr
    assert result.stderr.count("faults.inject_nonfinite_steps: making") == 1  # rank 1 only
    # Rank 1's infinite local gradient reached rank 0 through the all-reduce: both skipped step 2.
    for rank in (0, 1):
        assert f"rank {rank}: update of step 2 skipped, gradient norm inf" in result.stderr
    _, state = _assert_same_training_state(_checkpoint(run_dir, 1), _checkpoint(run_dir, 2))
    assert state["world_size"] == 2 and state["nonfinite_updates"] == 1

    # Resumed to step 6 with K = 2: rank 1's infinite gradients at 4 and 5 make both ranks roll
    # back to step 3 together (no checkpoint at 4 meanwhile), and 4 to 6 go through after it.
    result = launch(run_dir, *QUIET, "train.steps=6", "checkpoint.every=1", "data.batch_size=4",
                    "train.rollback_after_nonfinite=2", "faults.inject_nonfinite_steps=[4, 5]", "faults.inject_ranks=[1]",
                    "faults.inject_into=gradient", "faults.inject_value=inf", accelerate_config="cpu_ddp",
                    num_processes=2)  # fmt: skip
    for rank in (0, 1):
        assert f"rank {rank}: update of step 5 skipped, gradient norm inf" in result.stderr
    rolled_back = f"step 5: 2 updates in a row with a non-finite gradient norm; rolled back to {_checkpoint(run_dir, 3)}"
    assert rolled_back in result.stderr
    final = verify_checkpoint(_checkpoint(run_dir, 6))
    assert (final["rollbacks"], final["nonfinite_updates"]) == (1, 3)
    assert [p["batches_in_epoch"] for p in final["data"]] == [8, 8]  # each rank: 6 steps and the 2 that diverged


def _training_state(trainer: Trainer) -> dict:
    module = trainer.accelerator.unwrap_model(trainer.model)
    return {
        "step": trainer.step, "weights": {k: v.clone() for k, v in module.state_dict().items()},
        "ema": {k: v.clone() for k, v in trainer.ema.state_dict().items()},
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()), "scheduler": trainer.scheduler.state_dict(),
    }  # fmt: skip


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    _assert_bitwise_equal(a["weights"], b["weights"], f"{what}: weights")
    _assert_bitwise_equal(a["ema"], b["ema"], f"{what}: EMA")
    optimizer_a, optimizer_b = a["optimizer"], b["optimizer"]
    same_form = [json.loads(json.dumps(o["param_groups"])) for o in (optimizer_a, optimizer_b)]  # betas: tuple or list
    assert same_form[0] == same_form[1], what
    assert optimizer_a["state"].keys() == optimizer_b["state"].keys(), what
    for position, values in optimizer_a["state"].items():  # exp_avg, exp_avg_sq and AdamW's step
        _assert_bitwise_equal(values, optimizer_b["state"][position], f"{what}: optimizer state {position}")
    assert a["scheduler"] == b["scheduler"], what


class _WatchedTrainer(Trainer):
    """The real trainer, with a copy of its whole training state taken after each optimizer step
    (applied or skipped) and right after each rollback."""

    def train_step(self):
        stats = super().train_step()
        if stats is not None:
            skipped = stats["skip_rate"].item()
            self.after_steps.append(_training_state(self) | {"step": self.step + 1, "outcome_skip": skipped})
        return stats

    def roll_back(self) -> None:
        super().roll_back()
        self.after_rollbacks.append(_training_state(self))


@pytest.fixture
def one_thread():
    """One torch thread, as `accelerate launch` gives a process: on a busy machine, threads that
    wait for each other make a tiny model's step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _in_process_trainer(run_dir, data_cache, *overrides) -> _WatchedTrainer:
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        *TINY_MODEL, *QUIET, f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}", "data.batch_size=8",
        "data.num_workers=0", "optim.warmup_steps=1", "train.eval_every=1000", "train.image_every=1000",
        "train.log_every=1", *overrides,
    ])  # fmt: skip
    trainer = _WatchedTrainer(cfg, Accelerator(cpu=True))
    trainer.after_steps, trainer.after_rollbacks = [], []
    return trainer


def test_nonfinite_updates_are_skipped_bitwise_and_k_in_a_row_roll_back_to_the_checkpoint_before_them(tmp_path, data_cache,
                                                                                                     one_thread):
    # Checkpoints every 2 steps, K = 2: steps 3 and 4 get a NaN loss, each is skipped with
    # everything bitwise as after step 2, and after step 4 the run rolls back to step 2 (no
    # checkpoint is written at 4 meanwhile), then computes 3 and 4 again on the next batches.
    run_dir = tmp_path / "rollback"
    trainer = _in_process_trainer(run_dir, data_cache, "train.steps=6", "checkpoint.every=2",
                                  "train.rollback_after_nonfinite=2", "train.max_rollbacks=1",
                                  "faults.inject_nonfinite_steps=[3, 4]")  # fmt: skip
    trainer.fit()
    trainer.close()

    steps = trainer.after_steps
    outcomes = [(s["step"], s["outcome_skip"]) for s in steps]
    assert outcomes == [(1, 0), (2, 0), (3, 1), (4, 1), (3, 0), (4, 0), (5, 0), (6, 0)]
    _assert_same_state(steps[1], steps[2], "after the skipped step 3")
    _assert_same_state(steps[1], steps[3], "after the skipped step 4")
    assert steps[1]["optimizer"]["state"][0]["step"].item() == 2  # AdamW counted the 2 applied updates only
    assert steps[3]["scheduler"]["last_epoch"] == 2  # and so did the learning-rate schedule

    (restored,) = trainer.after_rollbacks
    target = _checkpoint(run_dir, 2)
    weights, optimizer_state, state = load_checkpoint(target)
    assert restored["step"] == 2
    names = [name for name, _ in trainer.model.named_parameters()]
    saved = {"step": 2, "weights": weights, "ema": load_ema(target), "scheduler": state["scheduler"],
             "optimizer": torch_from_portable(optimizer_state, names)}  # fmt: skip
    _assert_same_state(restored, saved, "after the rollback, against checkpoint step_000002")
    _assert_same_state(restored, steps[1], "after the rollback, against the state after step 2")

    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_000002", "step_000004", "step_000006"]
    final = verify_checkpoint(_checkpoint(run_dir, 6))
    assert (final["rollbacks"], final["nonfinite_updates"], final["skipped_updates"]) == (1, 2, 2)
    # The data went on: 8 batches were taken for 6 steps (the two that diverged are not replayed).
    (position,) = final["data"]
    assert (position["epoch"], position["batches_in_epoch"]) == (0, 8)
    client, run = _metrics(run_dir)
    assert run.data.metrics["train/rollbacks"] == 1 and run.data.metrics["train/nonfinite_updates"] == 2
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/skip_rate")]
    assert sorted(history) == [(1, 0), (2, 0), (3, 0), (3, 1), (4, 0), (4, 1), (5, 0), (6, 0)]
    assert run.data.tags["last_rollback"].startswith(f"step 4: 2 updates in a row with a non-finite gradient norm; "
                                                     f"rolled back to {target} (rollback 1 of at most 1)")  # fmt: skip


@pytest.mark.slow
def test_one_rollback_more_than_allowed_stops_with_exit_4_and_the_count_survives_a_resume(tmp_path, launch, data_cache,
                                                                                         one_thread):
    # Checkpoint every 2, K = 2, one rollback allowed: 3 and 4 diverge (back to 2), 3 and 4 go
    # through on the next batches (checkpoint 4), then 5 and 6 diverge: a second rollback needed.
    run_dir = tmp_path / "diverges"
    options = (*QUIET, "train.steps=8", "checkpoint.every=2", "train.rollback_after_nonfinite=2", "train.max_rollbacks=1",
               "faults.inject_nonfinite_steps=[3, 4, 5, 6]")  # fmt: skip
    # python pipeline/train.py: its exit code, not a launcher's (accelerate launch turns it into 1).
    result = launch(run_dir, *options, plain_python=True, env={"OMP_NUM_THREADS": "1"}, expect_failure=True)
    assert result.returncode == 4, result.stderr[-3000:]
    assert f"rolled back to {_checkpoint(run_dir, 2)} (rollback 1 of at most 1)" in result.stderr
    assert ("training stalled: 2 updates in a row with a non-finite gradient norm up to step 6, after 1 rollback(s) "
            "already (train.max_rollbacks=1)") in result.stderr  # fmt: skip
    assert "Traceback" not in result.stderr
    # The newest checkpoint is the last good one, whole, and counts the rollback made.
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    assert newest == _checkpoint(run_dir, 4)
    state = verify_checkpoint(newest)
    assert state["rollbacks"] == 1 and state["step"] == 4
    _, run = _metrics(run_dir)
    assert run.info.status == "FAILED"

    # Resumed from step 4 with its rollback counted, the same divergence at 5 and 6 stops the run
    # at once, where a count lost on resume would roll back once more.
    trainer = _in_process_trainer(run_dir, data_cache, *options[len(QUIET):])
    assert trainer.step == 4 and trainer.updates.rollbacks == 1
    with pytest.raises(TrainingDiverged, match=r"up to step 6, after 1 rollback\(s\) already"):
        trainer.fit()
    trainer.close("FAILED")
    assert trainer.after_rollbacks == [] and list_checkpoints(run_dir / "checkpoints")[-1] == newest
    assert verify_checkpoint(newest) == state
