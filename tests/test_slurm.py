"""slurm/train.sbatch submitted to a real Slurm (tests/slurm_cluster.py: nodes n1 and n2 on this
host), as a user would: two nodes, one task each, each task one machine of a two-machine
Accelerate launch (configs/accelerate/cpu_ddp_nodes.yaml) meeting over loopback.

The uninterrupted job is also the reference of the interrupted one: same config, same layout, so
a stop, requeue and resume must end on exactly its weights and its loss curve, in one MLflow run.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from tests.conftest import REPO, launch_command
from tests.slurm_cluster import slurm_cluster_fixture  # noqa: F401 (the fixture slurm_cluster)

pytestmark = pytest.mark.slow

STEPS = 16
# Checkpoints only at the end, or when stopped: the stop's own checkpoint is what a resume must use.
TRAINING = ("train.eval_at_start=false", "train.diagnostics=false", "train.final_iw_samples=0", "train.eval_batches=1",
            f"train.steps={STEPS}", "checkpoint.every=1000", "optim.schedule=constant")  # fmt: skip
# The script's GPU defaults replaced by what this host has: no GPUs, one CPU per node.
SBATCH_OPTIONS = ("--gres=none", "--cpus-per-task=1", "--time=10")


def _submit(cluster, directory: Path, data_cache: Path, *, env: dict | None = None, accelerate_config="cpu_ddp_nodes",
            options=SBATCH_OPTIONS, extra: tuple[str, ...] = ()):  # fmt: skip
    """``RUN_DIR=... sbatch slurm/train.sbatch configs/accelerate/<config>.yaml configs/quickstart.yaml ...``
    from the repository root, with the tests' tiny model; returns (job id, run dir, log dir)."""
    run_dir, log_dir = directory / "run", directory / "logs"
    log_dir.mkdir(parents=True)
    command = launch_command(run_dir, *TRAINING, *extra, data_cache=data_cache, plain_python=True)
    training = command[command.index("--config") + 1 :]
    job = cluster.submit(*options, f"--output={log_dir}/%x-%j.out", "slurm/train.sbatch",
                         f"configs/accelerate/{accelerate_config}.yaml", *training, cwd=REPO,
                         env={"RUN_DIR": str(run_dir), "LOG_DIR": str(log_dir), "PYTHON": sys.executable}
                         | (env or {}))  # fmt: skip
    return job, run_dir, log_dir


def _logs(log_dir: Path) -> str:
    """The batch log and the per-rank logs, for an assertion's message."""
    files = [p for p in sorted(log_dir.glob("*.*")) if p.is_file()]
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in files)


def _checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


def _state(run_dir: Path, step: int = STEPS) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:06d}" / "state.json").read_text())


def _history(run_dir: Path) -> tuple[list, list[tuple[int, float]]]:
    """Every MLflow run of the run directory, and the train/loss history of the only one."""
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    return runs, history


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, builtin_urls, data_cache, tmp_path_factory):
    job, run_dir, log_dir = _submit(slurm_cluster, tmp_path_factory.mktemp("slurm-whole"), data_cache)
    return slurm_cluster.wait(job), run_dir, log_dir


def test_a_two_node_job_trains_as_two_machines_to_the_end(uninterrupted):
    fields, run_dir, log_dir = uninterrupted
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "0"), _logs(log_dir)
    assert fields["NodeList"] == "n[1-2]" and fields["NumNodes"] == "2"
    state = _state(run_dir)
    assert state["step"] == STEPS and state["world_size"] == 2 and _checkpoints(run_dir) == [STEPS]
    # One task per node, each one machine of two, meeting at the first node's address.
    logs = {rank: (log_dir / f"hvae-{fields['JobId']}.rank{rank}.log").read_text() for rank in (0, 1)}
    assert "machine 0 of 2" in logs[0] and "machine 1 of 2" in logs[1], _logs(log_dir)
    assert all("meeting at 127.0.0.1:" in text for text in logs.values())
    runs, history = _history(run_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [step for step, _ in history] == list(range(1, STEPS + 1))


def _logged_steps(run_dir: Path) -> int:
    """The last train/loss step in the run's MLflow database, read as the job writes it."""
    try:
        with sqlite3.connect(f"file:{run_dir / 'mlflow.db'}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT MAX(step) FROM metrics WHERE key = 'train/loss'").fetchone()[0] or 0
    except sqlite3.Error:  # not created yet
        return 0


def test_the_warning_signal_checkpoints_requeues_and_resumes_exactly(slurm_cluster, uninterrupted, data_cache,
                                                                     tmp_path):  # fmt: skip
    reference = uninterrupted[1]
    # The run waits at step 3 for the signal: 16 tiny steps can all be done before scancel's
    # signal lands. The requeued start resumes at step 3 and does not wait there again.
    job, run_dir, log_dir = _submit(slurm_cluster, tmp_path, data_cache, extra=("faults.hold_at_step=3",))
    deadline = time.monotonic() + 240
    while _logged_steps(run_dir) < 3:
        assert time.monotonic() < deadline and slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), \
            _logs(log_dir)  # fmt: skip
        time.sleep(0.2)
    # What --signal=USR1@<seconds> does before the time limit: USR1 to every process of the job's steps.
    slurm_cluster.run("scancel", "--signal=USR1", job)
    fields = slurm_cluster.wait(job)
    logs = _logs(log_dir)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), logs
    assert "requeueing" in logs and "restart 1)" in logs
    # The stop wrote its own checkpoint mid-run, the requeued job resumed from it and finished.
    stopped, final = _checkpoints(run_dir)
    assert 3 <= stopped < STEPS and final == STEPS, _checkpoints(run_dir)
    assert _state(run_dir)["world_size"] == 2
    # Exactly the uninterrupted job's weights and losses, in one MLflow run with every step once.
    ours, theirs = (load_file(d / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors")
                    for d in (run_dir, reference))  # fmt: skip
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    runs, history = _history(run_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == _state(run_dir)["mlflow_run_id"] == _state(run_dir, stopped)["mlflow_run_id"]
    assert [step for step, _ in history] == list(range(1, STEPS + 1))
    assert history == _history(reference)[1]


# --- with a stand-in for the interpreter: what launch.sh derives, what train.sbatch decides ---


@pytest.fixture
def stub_python(tmp_path) -> Path:
    stub = tmp_path / "python"
    stub.write_text("#!/bin/bash\n# Stands in for the Python that runs slurm/accelerate_launch.py: says what it\n"
                    "# was given, then exits with this task's code of STUB_EXIT_CODES.\n"
                    "echo \"stub: $*\" >&2\ncodes=($STUB_EXIT_CODES)\nexit \"${codes[$SLURM_PROCID]}\"\n")  # fmt: skip
    stub.chmod(0o755)
    return stub


def test_gpus_per_node_and_deepspeed_come_from_the_job(slurm_cluster, stub_python, data_cache, tmp_path):
    """A GPU job as a cluster would run it (--gres=gpu:2 per node, configs/accelerate/zero2.yaml):
    every node's launch gets 2 machines, its own rank, 2 x 2 processes, the first node's address,
    the job's port, and DeepSpeed's launcher that leaves starting the nodes to srun."""
    job, run_dir, log_dir = _submit(slurm_cluster, tmp_path, data_cache, accelerate_config="zero2",
                                    options=("--gres=gpu:2", "--cpus-per-task=2", "--time=10"),
                                    env={"PYTHON": str(stub_python), "STUB_EXIT_CODES": "0 0"})  # fmt: skip
    fields = slurm_cluster.wait(job)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), _logs(log_dir)
    port = 15000 + int(job) % 15000
    for rank in (0, 1):
        log = (log_dir / f"hvae-{job}.rank{rank}.log").read_text()
        line = next(x for x in log.splitlines() if x.startswith("stub:"))
        assert (f"slurm/accelerate_launch.py --config_file configs/accelerate/zero2.yaml --num_machines 2 "
                f"--machine_rank {rank} --num_processes 4 --main_process_ip 127.0.0.1 --main_process_port {port} "
                "--num_cpu_threads_per_process 1 --deepspeed_multinode_launcher standard pipeline/train.py "
                f"--config {REPO / 'configs' / 'quickstart.yaml'} ") in line, line  # fmt: skip
        assert line.endswith(f" train.run_dir={run_dir}")


def test_a_failure_on_one_node_fails_the_job_even_beside_a_checkpointed_stop(slurm_cluster, stub_python, data_cache,
                                                                            tmp_path):  # fmt: skip
    job, _, log_dir = _submit(slurm_cluster, tmp_path, data_cache,
                              env={"PYTHON": str(stub_python), "STUB_EXIT_CODES": "75 1"})  # fmt: skip
    fields = slurm_cluster.wait(job)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("FAILED", "1:0", "0"), _logs(log_dir)
    assert "rank 0: 75; rank 1: 1;" in _logs(log_dir)


def test_requeues_stop_at_max_requeues(slurm_cluster, stub_python, data_cache, tmp_path):
    stub = {"PYTHON": str(stub_python), "STUB_EXIT_CODES": "75 75", "MAX_REQUEUES": "1"}
    job, _, log_dir = _submit(slurm_cluster, tmp_path, data_cache, env=stub)
    fields = slurm_cluster.wait(job)
    logs = _logs(log_dir)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("FAILED", "75:0", "1"), logs
    assert "requeued 1 times already (MAX_REQUEUES)" in logs
