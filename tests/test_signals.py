"""Stopping early and resuming: signals, train.time_limit, exit code 75, the MLflow run KILLED and
reopened, and plain progress lines in a log file. Real training processes, 1 and 2 ranks.

A signal must land at a known step however fast or slow the machine: the test-only settings
``faults.hold_at_step=<step>`` (and ``faults.hold_seconds``) make the trainer wait at that
step's boundary until a stop is requested (pipeline/stopping.py). The test waits for the trainer to say it is
holding, then signals. One test signals without a hold, at whatever moment the run is in.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import psutil
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from pipeline.checkpoint import list_checkpoints
from pipeline.config import ConfigError, TrainConfig, load_config, parse_duration
from pipeline.progress import Progress, format_duration
from pipeline.stopping import (
    EXIT_INTERRUPTED,
    EXIT_RESUMABLE,
    SIGNAL_NAMES,
    STOPPED_FILE,
    TIME_LIMIT,
    StopRequests,
)
from tests.conftest import REPO, launch_command
from tests.conftest import test_environment as environment  # (an alias: pytest would collect test_*)

slow = pytest.mark.slow

# Short runs: no evaluation but the final one (one batch), checkpoints only where a run stops
# or ends, a progress line at every step (the output is a file, as under sbatch).
COMMON = (
    "train.eval_at_start=false", "train.diagnostics=false", "train.final_iw_samples=0", "train.eval_batches=1",
    "checkpoint.every=1000", "checkpoint.keep_last=10", "train.progress_every=0.001",
)  # fmt: skip


# --- the config -------------------------------------------------------------------------------


def test_stop_settings_are_validated():
    cfg = load_config(None, ["train.stop_signals=[TERM,USR1]", "train.time_limit=3h50m"])
    assert cfg.train.stop_signals == ["TERM", "USR1"] and cfg.train.time_limit_seconds() == 3 * 3600 + 50 * 60
    defaults = load_config(None, [])
    assert defaults.train.stop_signals == ["TERM", "INT", "USR1"] and defaults.train.time_limit_seconds() is None
    assert load_config(None, ["train.stop_signals=[]"]).train.stop_signals == []
    assert load_config(None, ["train.time_limit=90"]).train.time_limit_seconds() == 90
    allowed = typing.get_args(typing.get_args(typing.get_type_hints(TrainConfig)["stop_signals"])[0])
    assert allowed == SIGNAL_NAMES  # what the loader's workers ignore is what the config may name
    for bad, words in [
        ("train.stop_signals=[SIGTERM]", ["train.stop_signals[0]", "'SIGTERM'", "'TERM'", "'USR1'"]),
        ("train.stop_signals=TERM", ["train.stop_signals", "expected a list"]),
        ("train.time_limit=3x", ["train.time_limit", "3h50m", "'3x'"]),
        ("train.time_limit=0", ["train.time_limit", "> 0"]),
        ("train.time_limit=-5m", ["train.time_limit"]),
        ("train.time_limit=true", ["train.time_limit", "expected str or float"]),
        ("train.progress_every=0", ["train.progress_every", "> 0"]),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(None, [bad])
        assert all(word in str(info.value) for word in words), (bad, str(info.value))


def test_durations():
    assert parse_duration("3h50m") == 13800 and parse_duration("90m") == 5400 and parse_duration("45s") == 45
    assert parse_duration("1.5h") == 5400 and parse_duration("2d 1h") == 176400 and parse_duration("120") == 120
    assert parse_duration(7.5) == 7.5
    for bad in ("", "h", "3h50", "ten minutes", "1:30:00"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert format_duration(3725) == "1h02m" and format_duration(550) == "9m10s" and format_duration(45) == "45s"


# --- the flag, in this process ------------------------------------------------------------------


class OneProcess:
    num_processes = 1


def test_a_signal_sets_the_flag_and_nothing_else():
    assert EXIT_RESUMABLE == 75
    stop = StopRequests(["USR1", "USR2"])
    previous = signal.getsignal(signal.SIGUSR1)
    stop.install()
    try:
        assert stop.should_stop(OneProcess(), 0) == 0
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second, other signal changes nothing
        assert stop.should_stop(OneProcess(), 1) == signal.SIGUSR2
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_the_time_limit_waits_for_a_step_and_is_rank_0s():
    now = [0.0]
    stop = StopRequests([], time_limit_s=10, clock=lambda: now[0])
    other_rank = StopRequests([], time_limit_s=10, clock=lambda: now[0], main_process=False)
    now[0] = 60.0  # the set-up took longer than the limit: still, one step is made
    assert stop.should_stop(OneProcess(), 5) == 0 and other_rank.should_stop(OneProcess(), 5) == 0
    assert stop.should_stop(OneProcess(), 6) == TIME_LIMIT
    assert other_rank.should_stop(OneProcess(), 6) == 0  # its answer comes from rank 0 through agree()


def test_the_test_hold_waits_where_this_start_trained_to_not_where_it_resumed():
    """faults.hold_at_step in a requeued job: the same command resumes at the hold's step and
    must go on, not wait 300 s for a signal that came to the start before."""
    resumed = StopRequests([], hold=(3, 0.0))
    started = time.monotonic()
    assert resumed.should_stop(OneProcess(), 3) == 0  # resumed at step 3: no hold
    assert time.monotonic() - started < 1
    fresh = StopRequests([], hold=(3, 0.0))
    assert fresh.should_stop(OneProcess(), 0) == 0
    fresh.code = signal.SIGUSR1  # the request the hold waits for, already there
    assert fresh.should_stop(OneProcess(), 3) == signal.SIGUSR1


def test_a_worker_dies_with_its_training_process_even_when_it_is_busy():
    """A trainer killed with SIGKILL must not leave its loader workers behind: torch's notice only
    between tasks, and then wait at exit on their result queue (pipeline.stopping.exit_with_parent)."""
    script = (
        "import multiprocessing, os, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from pipeline.stopping import exit_with_parent\n"
        "def busy(parent):\n"
        "    exit_with_parent(parent)\n"
        "    time.sleep(120)  # a worker that would not look at its parent for a long while\n"
        "worker = multiprocessing.get_context('fork').Process(target=busy, args=(os.getpid(),))\n"
        "worker.start()\n"
        "print(worker.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = psutil.Process(int(trainer.stdout.readline()))
    time.sleep(0.5)  # the worker has asked for the parent-death signal
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if worker.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        worker.kill()
        pytest.fail("the worker outlived its training process by 5 s")


def test_a_second_sigint_exits_at_once_but_a_repeat_within_a_second_does_not():
    script = (
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from pipeline.stopping import StopRequests\n"
        "stop = StopRequests(['TERM', 'INT']); stop.install()\n"
        "for _ in range(3): os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT)\n"
        "print('alive', stop.code, flush=True)\n"
        "time.sleep(1.2)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(5); print('not reached')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == EXIT_INTERRUPTED
    assert result.stdout == f"alive {int(signal.SIGTERM)}\n"
    assert result.stderr.count("received SIGTERM") == 1 and "second SIGINT" in result.stderr


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_on_a_terminal_even_when_only_stdout_is_one(monkeypatch):
    """``accelerate launch`` with one process pipes stderr through itself; stdout stays a terminal."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(sys, "stdout", Terminal())
    progress = Progress(10, 0, enabled=True, every_s=30)
    progress.update(1)
    progress.close()
    assert progress.stream is sys.stdout and "\r" in sys.stdout.getvalue() and "1/10" in sys.stdout.getvalue()
    assert Progress(10, 0, enabled=False, every_s=30).bar is None  # other ranks: nothing at all


def test_progress_lines_without_a_terminal(caplog):
    now = [0.0]
    progress = Progress(100, 10, enabled=True, every_s=30, clock=lambda: now[0], stream=None)
    with caplog.at_level(logging.INFO, logger="pipeline.progress"):
        for step in range(11, 51):
            now[0] += 1.0
            progress.metrics(4.5678, 1234.0)
            progress.update(step)
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    # At 30 s (step 40) and at the end (step 50); the rate (1 step/s) gives the ETA.
    assert lines == ["step 40/100 (40%), loss 4.568, 1,234 images/s, ETA 1m00s",
                     "step 50/100 (50%), loss 4.568, 1,234 images/s, ETA 50s"]  # fmt: skip


# --- real processes -----------------------------------------------------------------------------


class Training:
    """A training command running in its own session (so that a signal to its process group
    reaches it and its children only), output to a file as under sbatch."""

    def __init__(self, command: list[str], log: Path, hold: int | None = None, hold_seconds: float = 0,
                 env: dict | None = None) -> None:  # fmt: skip
        self.log = log
        env = environment(env or {})
        if hold:
            command = [*command, f"faults.hold_at_step={hold}", f"faults.hold_seconds={hold_seconds}"]
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.process.poll() is not None:
                raise AssertionError(f"exited with {self.process.returncode} before {text!r}:\n{self.output[-4000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output[-4000:]}")
            time.sleep(0.1)

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.output[-4000:]}") from None

    def kill(self) -> None:
        """The launcher and every process under it (torchrun's ranks have sessions of their own)."""
        try:
            processes = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass

    def rank(self, rank: int) -> psutil.Process:
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "train.py" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        raise AssertionError(f"no process of rank {rank}")


def _run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "checkpoints" / list_checkpoints(run_dir / "checkpoints")[-1].name / "state.json")
                      .read_text())["mlflow_run_id"]  # fmt: skip


def _client(run_dir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")


def _assert_stopped(run_dir: Path, step: int, reason: str, output: str) -> None:
    """A checkpoint of ``step`` (the last completed one: the last logged), the record, KILLED."""
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == f"step_{step:06d}", output[-3000:]
    state = json.loads((run_dir / "checkpoints" / f"step_{step:06d}" / "state.json").read_text())
    assert state["step"] == step
    record = json.loads((run_dir / STOPPED_FILE).read_text())
    assert record["exit_code"] == EXIT_RESUMABLE and record["step"] == step and record["reason"] == reason
    client = _client(run_dir)
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["last_stop"] == f"step {step}: {reason}"
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == step
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert f"stopped after step {step} ({reason})" in output


def _assert_same_weights(a: Path, b: Path, step: int) -> None:
    x = load_file(a / "checkpoints" / f"step_{step:06d}" / "model.safetensors")
    y = load_file(b / "checkpoints" / f"step_{step:06d}" / "model.safetensors")
    assert x.keys() == y.keys()
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, f"parameters that differ from the uninterrupted run: {different[:5]}"


def _assert_finished_in_one_run(run_dir: Path, steps: int, run_id: str) -> None:
    """The same MLflow run from the first start, FINISHED, each step logged exactly once."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mlflow_run_id"] == run_id and summary["step"] == steps
    client = _client(run_dir)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, steps + 1))
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    assert not (run_dir / STOPPED_FILE).exists()


def _assert_log_file_friendly(output: str) -> None:
    """No carriage return (no progress bar) in a log file, and the plain progress lines."""
    assert "\r" not in output
    assert "INFO pipeline.progress: step " in output and "images/s, ETA" in output


@slow
def test_one_process_stops_on_signals_and_resumes_exactly(tmp_path, data_cache):
    """SIGTERM to the whole process group (the training process and its loader worker), then
    SIGINT (Ctrl-C): each time exit 75, a checkpoint of the step, the MLflow run KILLED; the
    same command then reopens the run (RUNNING) and the last one ends where 6 uninterrupted steps
    do, weights bit for bit, every step logged once in one MLflow run."""
    steps = 6
    settings = (*COMMON, f"train.steps={steps}", "data.num_workers=1")

    def command(run_dir):
        return launch_command(run_dir, *settings, data_cache=data_cache, plain_python=True)

    run_dir = tmp_path / "stopped"
    first = Training(command(run_dir), tmp_path / "1.log", hold=2)
    first.wait_for("test hold at step 2")
    os.killpg(first.process.pid, signal.SIGTERM)  # as SLURM or a terminal would: every process
    assert first.finish() == EXIT_RESUMABLE, first.output[-3000:]
    _assert_stopped(run_dir, 2, "SIGTERM", first.output)
    run_id = _run_id(run_dir)

    second = Training(command(run_dir), tmp_path / "2.log", hold=4)
    second.wait_for("test hold at step 4")
    assert _client(run_dir).get_run(run_id).info.status == "RUNNING"  # reopened by the resume
    assert not (run_dir / STOPPED_FILE).exists()
    second.process.send_signal(signal.SIGINT)
    assert second.finish() == EXIT_RESUMABLE, second.output[-3000:]
    _assert_stopped(run_dir, 4, "SIGINT", second.output)
    assert _run_id(run_dir) == run_id

    last = Training(command(run_dir), tmp_path / "3.log")
    assert last.finish() == 0, last.output[-3000:]
    # (The reference's MLflow store is not looked at: not creating one saves seconds.)
    straight = Training([*command(tmp_path / "straight"), "tracking.enabled=false"], tmp_path / "straight.log")
    assert straight.finish() == 0, straight.output[-3000:]
    _assert_same_weights(run_dir, tmp_path / "straight", steps)
    _assert_finished_in_one_run(run_dir, steps, run_id)
    for run in (first, second, last, straight):
        _assert_log_file_friendly(run.output)


@slow
def test_two_processes_stop_together_and_resume_exactly(tmp_path, data_cache):
    """2 ranks (accelerate launch, DDP over gloo). SIGTERM to the launcher: torchrun forwards it
    to both ranks. SIGUSR1 to the launcher: forwarded too when PET_SIGNALS_TO_HANDLE names it.
    SIGUSR1 to rank 1 alone: the ranks agree, both stop after the same step. Every time the ranks
    exit 75 with a checkpoint; the last rerun ends with the weights of an uninterrupted run, in
    one MLflow run."""
    steps = 5
    run_dir = tmp_path / "stopped"
    command = launch_command(run_dir, *COMMON, f"train.steps={steps}", "data.batch_size=4", data_cache=data_cache,
                             accelerate_config="cpu_ddp", num_processes=2)  # fmt: skip

    first = Training(command, tmp_path / "1.log", hold=1)
    first.wait_for("test hold at step 1")
    first.process.send_signal(signal.SIGTERM)
    # The launcher exits with 128 + the signal whatever its workers did; they exited 75 in time:
    # no SIGKILL after torchrun's grace period.
    assert first.finish() == 128 + signal.SIGTERM, first.output[-3000:]
    assert "forcefully exiting" not in first.output
    assert first.output.count("received SIGTERM") == 2  # each rank, once
    _assert_stopped(run_dir, 1, "SIGTERM", first.output)
    run_id = _run_id(run_dir)

    usr1 = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}  # torchrun's default + SIGUSR1
    second = Training(command, tmp_path / "2.log", hold=2, env=usr1)
    second.wait_for("test hold at step 2")
    second.process.send_signal(signal.SIGUSR1)
    assert second.finish() == 128 + signal.SIGUSR1, second.output[-3000:]
    assert second.output.count("received SIGUSR1") == 2 and "forcefully exiting" not in second.output
    _assert_stopped(run_dir, 2, "SIGUSR1", second.output)

    third = Training(command, tmp_path / "3.log", hold=3)
    third.wait_for("test hold at step 3")
    third.rank(1).send_signal(signal.SIGUSR1)
    # A rank's exit 75 is a failed worker to torchrun, and accelerate launch exits with 1; the
    # stop record says what happened (a requeue script reads it).
    assert third.finish() == 1, third.output[-3000:]
    assert "exitcode  : 75" in third.output and "[rank 1] received SIGUSR1" in third.output
    assert "[rank 0] received" not in third.output
    _assert_stopped(run_dir, 3, "SIGUSR1", third.output)

    last = Training(command, tmp_path / "4.log")
    assert last.finish() == 0, last.output[-3000:]
    straight_dir = tmp_path / "straight"
    straight = Training([*launch_command(straight_dir, *COMMON, f"train.steps={steps}", "data.batch_size=4",
                                         data_cache=data_cache, accelerate_config="cpu_ddp", num_processes=2),
                         "tracking.enabled=false"], tmp_path / "straight.log")  # fmt: skip
    assert straight.finish() == 0, straight.output[-3000:]
    _assert_same_weights(run_dir, straight_dir, steps)
    _assert_finished_in_one_run(run_dir, steps, run_id)
    for run in (first, second, third, last, straight):
        assert "\r" not in run.output


@slow
def test_a_signal_in_the_middle_of_a_step_is_acted_on_at_its_end(tmp_path, data_cache):
    """No hold: SIGTERM to the process group at whatever moment (computing, reading a batch, in
    a loader worker), repeatedly. The run stops after a whole step, whose checkpoint it writes."""
    run_dir = tmp_path / "run"
    run = Training(launch_command(run_dir, *COMMON, "train.steps=100000", "data.num_workers=2",
                                  data_cache=data_cache, plain_python=True), tmp_path / "run.log")  # fmt: skip
    run.wait_for("pipeline.progress: step 3/")
    for _ in range(3):
        os.killpg(run.process.pid, signal.SIGTERM)
        time.sleep(0.01)
    assert run.finish() == EXIT_RESUMABLE, run.output[-3000:]
    step = json.loads((run_dir / STOPPED_FILE).read_text())["step"]
    assert step >= 3
    _assert_stopped(run_dir, step, "SIGTERM", run.output)


@slow
def test_the_time_limit_stops_the_run_like_a_signal(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    run = Training(launch_command(run_dir, *COMMON, "train.steps=100000", "train.time_limit=1s",
                                  data_cache=data_cache, plain_python=True), tmp_path / "run.log")  # fmt: skip
    assert run.finish() == EXIT_RESUMABLE, run.output[-3000:]
    # The set-up alone takes longer than 1 s; a process still makes one step before it stops.
    _assert_stopped(run_dir, 1, "train.time_limit", run.output)


@slow
def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    # Held at step 2 for 120 s after the first SIGINT: only the second can end it sooner.
    run = Training(launch_command(run_dir, *COMMON, "train.steps=10", "tracking.enabled=false", data_cache=data_cache,
                                  plain_python=True), tmp_path / "run.log", hold=2, hold_seconds=120)  # fmt: skip
    run.wait_for("test hold at step 2")
    run.process.send_signal(signal.SIGINT)
    run.wait_for("received SIGINT")
    time.sleep(1.5)  # past the window in which a repeat counts as the same SIGINT
    run.process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    assert run.finish(timeout=60) == EXIT_INTERRUPTED, run.output[-3000:]
    assert time.monotonic() - sent < 10
    assert "second SIGINT: exiting at once" in run.output
    assert list_checkpoints(run_dir / "checkpoints") == [] and not (run_dir / STOPPED_FILE).exists()
