"""One launch per run directory (pipeline/run_lock.py), with real training processes: a second
launch on a busy run dir is refused at once while the first finishes; a SIGKILLed run leaves no
lock behind, and its rerun resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, launch_command
from tests.conftest import test_environment as environment  # (an alias: pytest would collect test_*)

FAST = ["train.eval_at_start=false", "train.diagnostics=false", "train.final_iw_samples=0", "train.eval_batches=1",
        "tracking.enabled=false"]


def _wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.1)


def _holder(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / ".lock").read_text() or "{}")
    except (OSError, ValueError):
        return {}


@pytest.fixture
def gated_data(tmp_path, builtin_urls) -> tuple[str, Path]:
    """A manifest whose training shard is a ``pipe:`` that waits for a file to appear: a run on it
    holds its lock and blocks at its first training batch until the test lets it go."""
    folder = Path(builtin_urls[0]).parent
    manifest = json.loads((folder / "manifest.json").read_text())
    gate = tmp_path / "go"
    train = manifest["splits"]["train"]
    train["shards"] = [{**train["shards"][0], "name": f"pipe:while [ ! -e {gate} ]; do sleep 0.05; done; "
                                                      f"cat {folder / train['shards'][0]['name']}"}]  # fmt: skip
    train["samples"] = train["shards"][0]["samples"]
    heldout = manifest["splits"]["heldout"]
    heldout["shards"] = [{**s, "name": str(folder / s["name"])} for s in heldout["shards"]]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    return str(tmp_path / "data" / "manifest.json"), gate


def test_a_second_launch_on_a_busy_run_dir_is_refused_at_once_while_the_first_finishes(tmp_path, data_cache,
                                                                                       gated_data):
    manifest, gate = gated_data
    run_dir = tmp_path / "run"
    command = launch_command(run_dir, f"data.train_urls={manifest}#train", f"data.eval_urls={manifest}#heldout",
                             "data.allow_pipe=true", "train.steps=1", *FAST, data_cache=data_cache, plain_python=True)  # fmt: skip
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env=environment())  # fmt: skip
    try:
        _wait_for(lambda: _holder(run_dir).get("pid") == first.pid, "lock record of the first run", first)
        started = time.monotonic()
        second = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment(), timeout=180)
        refused_in = time.monotonic() - started
        assert first.poll() is None, "the first run must still be running (it waits for the gate)"
        assert second.returncode == 2, second.stderr[-3000:]
        holder = _holder(run_dir)
        message = (f"run dir {run_dir} is in use by pid {first.pid} on host {holder['host']} since {holder['started']}; "
                   "wait for it, stop it, or choose another train.run_dir")  # fmt: skip
        assert f"run dir error: {message}" in second.stderr, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert "resumed from" not in second.stderr and "saved" not in second.stderr  # refused before its trainer
        gate.touch()
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert (run_dir / "checkpoints" / "step_000001" / "model.safetensors").exists()
    print(f"second launch refused in {refused_in:.1f} s (interpreter, imports and Accelerator included)")


def test_a_sigkilled_run_leaves_no_lock_and_its_rerun_resumes(tmp_path, launch, data_cache):
    from pipeline.run_lock import RunDirLock

    run_dir = tmp_path / "run"
    overrides = ["train.steps=3", "checkpoint.every=1", *FAST]
    log = tmp_path / "first.log"
    with open(log, "w") as stderr:
        # Held at step 2's boundary (after the checkpoint of step 1), with its loader workers alive.
        command = launch_command(run_dir, *overrides, "data.num_workers=2", "faults.hold_at_step=2", data_cache=data_cache,
                                 plain_python=True)  # fmt: skip
        first = subprocess.Popen(command,
                                 stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO,
                                 env=environment())  # fmt: skip
    try:
        _wait_for(lambda: "test hold at step 2" in log.read_text(), "hold at step 2", first)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
    assert first.returncode == -signal.SIGKILL
    assert _holder(run_dir).get("pid") == first.pid  # the record stays; the lock went with the process
    # At once, while its orphaned loader workers may still live: they closed their copy at fork.
    with RunDirLock(run_dir):
        pass
    result = launch(run_dir, *overrides, plain_python=True, timeout=300)  # (without workers: quicker)
    assert "resumed from" in result.stderr and "step_000001" in result.stderr, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step_000003" / "model.safetensors").exists()
    assert _holder(run_dir).get("pid") not in (None, first.pid)


def _signal_then_sleep(started) -> None:
    started.set()
    time.sleep(60)


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_lets_go(tmp_path):
    # DataLoader workers are forked from the trainer: had they kept their copy of the descriptor,
    # a SIGKILLed trainer's orphaned workers would hold the lock until they noticed (seconds).
    import multiprocessing

    from pipeline.run_lock import RunDirInUse, RunDirLock

    lock = RunDirLock(tmp_path)
    lock.acquire()
    with pytest.raises(RunDirInUse, match=f"in use by pid {os.getpid()} on host "):
        RunDirLock(tmp_path).acquire()
    context = multiprocessing.get_context("fork")
    started = context.Event()
    child = context.Process(target=_signal_then_sleep, args=(started,))
    child.start()
    try:
        assert started.wait(60)  # the child runs (its at-fork hooks ran before its first line)
        lock.release()
        with RunDirLock(tmp_path):  # the child is alive, and holds nothing
            assert child.is_alive()
    finally:
        child.kill()
        child.join()
