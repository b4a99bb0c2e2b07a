"""Issue #13: training never waits on MLflow, and no metric point is lost while the tracking
server is down: at the start, mid-run (back later, or never: ``pipeline-sync``), across a stop
and a resume. A real ``mlflow server`` (SQLite, artifacts in a temporary directory, 127.0.0.1)
is stopped and started by the tests; the trainings and syncs are real processes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.stopping import EXIT_RESUMABLE
from pipeline.tracking import Tracker
from pipeline.tracking_spool import TrackingSpool
from tests.conftest import REPO, launch_command
from tests.conftest import test_environment as environment  # (an alias: pytest would collect test_*)
from tests.servers import local_mlflow_server

slow = pytest.mark.slow

# Short runs: no evaluation but the final one (one batch), checkpoints only where a run stops or
# ends, a system metric sample every second.
SETTINGS = (
    "train.eval_at_start=false", "train.diagnostics=false", "train.final_iw_samples=0", "train.eval_batches=1",
    "checkpoint.every=1000", "train.progress_every=1", "tracking.system_metrics_interval=1",
)  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module, started and stopped by the tests (starting one takes 10-30 s
    on a busy machine: a test that finds it in the state it needs saves that)."""
    server = local_mlflow_server(tmp_path_factory.mktemp("mlflow-store"))
    yield server
    server.stop()


class Training:
    """``python pipeline/train.py`` logging to ``url``, output to a file."""

    def __init__(self, run_dir: Path, *overrides: str, data_cache: Path, url: str, log: Path) -> None:
        self.run_dir, self.log = run_dir, log
        command = launch_command(run_dir, *SETTINGS, *overrides, data_cache=data_cache, plain_python=True)
        # One intra-op thread: on a loaded 2-core machine torch's spinning OpenMP threads make a
        # tiny step take seconds instead of ~0.1 s, and these runs need many steps in little time.
        env = environment({"MLFLOW_TRACKING_URI": url, "OMP_NUM_THREADS": "1"})
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def spooled(self) -> list[tuple[int, float]]:
        """(step, seconds since the epoch) of each ``train/loss`` point in the spool."""
        spool = self.run_dir / "tracking" / "spool.jsonl"
        records = [json.loads(line) for line in spool.read_text().splitlines()] if spool.exists() else []
        return [(r["step"], r["ts"] / 1000) for r in records if r["op"] == "metrics" and "train/loss" in r["metrics"]]

    def run_id(self) -> str | None:
        state = self.run_dir / "tracking" / "run.json"
        return json.loads(state.read_text())["run_id"] if state.exists() else None

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"exited ({self.process.returncode}) before {what}:\n{self.output[-4000:]}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"no {what} within {timeout} s:\n{self.output[-4000:]}")
            time.sleep(0.05)

    def wait_for_step(self, step: int) -> None:
        self.wait_for(lambda: any(s >= step for s, _ in self.spooled()), f"step {step} in the spool")

    def finish(self, timeout: float = 400) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.output[-4000:]}") from None


def sync(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.sync", str(run_dir)], cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def loss_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


@slow
def test_a_server_down_at_start_then_a_stop_and_a_resume_give_one_run_with_every_step_once(server, tmp_path, data_cache):
    """The server is down when the run starts: it trains, keeping its records on disk; stopped
    (SIGTERM, exit 75) with no MLflow run created yet, the resumed job creates the run once the
    server is up and sends the first start's points and its own into it, each step once."""
    server.stop()
    steps, run_dir = 30, tmp_path / "run"
    common = (f"train.steps={steps}", "tracking.experiment=down-at-start")
    first = Training(run_dir, *common, "tracking.flush_timeout=1", data_cache=data_cache, url=server.url,
                     log=tmp_path / "first.log")  # fmt: skip
    first.wait_for_step(3)
    first.process.send_signal(signal.SIGTERM)
    assert first.finish() == EXIT_RESUMABLE, first.output[-3000:]
    assert first.run_id() is None  # the server never answered: the run exists only in the spool
    assert "tracking records not uploaded; run `pipeline-sync" in first.output
    stopped_at = max(s for s, _ in first.spooled())
    assert 3 <= stopped_at < steps

    # The resumed job starts while the server is still coming up.
    starting = threading.Thread(target=server.start)
    starting.start()
    second = Training(run_dir, *common, "tracking.flush_timeout=300", data_cache=data_cache, url=server.url,
                      log=tmp_path / "second.log")  # fmt: skip
    assert second.finish() == 0, second.output[-3000:]
    starting.join()

    client = MlflowClient(tracking_uri=server.url)
    run_id = second.run_id()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert loss_steps(client, run_id) == list(range(1, steps + 1))  # no gap, no repeat
    assert run.data.params["train.steps"] == str(steps)  # logged offline by the first start
    assert run.data.tags["last_stop"] == f"step {stopped_at}: SIGTERM"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert json.loads((run_dir / "summary.json").read_text())["step"] == steps


@slow
def test_a_server_stopped_mid_run_loses_nothing_whether_it_comes_back_or_not(server, tmp_path, data_cache):
    """Two runs log to one server; it is killed mid-run. Neither waits for it. The first
    waits at its end for the server, which is started again: every step's point is read back.
    The second ends while it is still down: its points stay in the spool, `pipeline-sync`
    uploads them to the server started again (the same database), a second sync sends nothing."""
    if not server.running:
        server.start()
    steps = 30
    back = Training(tmp_path / "back", f"train.steps={steps}", "tracking.experiment=back", "tracking.flush_timeout=300",
                    data_cache=data_cache, url=server.url, log=tmp_path / "back.log")  # fmt: skip
    never = Training(tmp_path / "never", f"train.steps={steps}", "tracking.experiment=never", "tracking.flush_timeout=1",
                     data_cache=data_cache, url=server.url, log=tmp_path / "never.log")  # fmt: skip
    for run in (back, never):
        run.wait_for(run.run_id, "an MLflow run created")
        run.wait_for_step(3)
    server.kill()  # at once: a graceful stop would take seconds, the whole run on a fast machine
    down_since = time.time()
    assert never.finish() == 0, never.output[-3000:]
    assert "tracking records not uploaded; run `pipeline-sync" in never.output
    back_at = time.time()
    server.start()
    assert back.finish() == 0, back.output[-3000:]

    # Training went on at full pace while the server was down (the old client waited ~248 s per call).
    during = [t for _, t in back.spooled() if down_since <= t <= back_at]
    assert len(during) >= 10, (down_since, back_at, back.spooled()[-5:])
    assert max(b - a for a, b in zip(during, during[1:])) < 5.0

    client = MlflowClient(tracking_uri=server.url)
    run = client.get_run(back.run_id())
    assert run.info.status == "FINISHED"
    assert loss_steps(client, back.run_id()) == list(range(1, steps + 1))
    assert {"encoder", "eval"} <= {a.path for a in client.list_artifacts(back.run_id())}
    # MLflow's system metrics, sampled every second, each sample once.
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        samples = sorted(m.step for m in client.get_metric_history(back.run_id(), key))
        assert samples and samples == list(range(len(samples))), (key, samples)

    spooled = sorted(s for s, _ in never.spooled())
    assert spooled == list(range(1, steps + 1))
    assert loss_steps(client, never.run_id()) != spooled  # some were logged while the server was down
    first = sync(never.run_dir)
    assert first.returncode == 0 and f"to MLflow run {never.run_id()}" in first.stdout, first.stdout + first.stderr
    assert loss_steps(client, never.run_id()) == list(range(1, steps + 1))
    assert client.get_run(never.run_id()).info.status == "FINISHED"
    again = sync(never.run_dir)
    assert again.returncode == 0 and "nothing to upload" in again.stdout, again.stdout + again.stderr
    assert loss_steps(client, never.run_id()) == list(range(1, steps + 1))


def test_a_server_that_accepts_but_never_answers_costs_the_logging_calls_nothing(tmp_path, monkeypatch):
    """A hung server (its port accepts connections, nothing answers): each request of the
    uploader waits tracking.request_timeout, the logging calls do not wait at all, the end of the
    run waits tracking.flush_timeout, and every record is still in the spool."""
    # The tracker sets these for its whole process: recorded here (at MLflow's defaults) so that
    # they are restored after the test.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes the connections; no one reads them
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        tracker = Tracker(active=True, tracking_uri=url, experiment="hung", run_dir=tmp_path, new_run=True,
                          flush_timeout=2, request_timeout=1)  # fmt: skip
        start = time.perf_counter()
        tracker.log_params({"train.steps": 200})
        for step in range(1, 201):
            tracker.log_metrics({"train/loss": 1.0 / step}, step)
        logging = time.perf_counter() - start
        tracker.close("FINISHED")
        closing = time.perf_counter() - start - logging
    assert logging < 2.0, logging  # 201 calls (the old client: up to ~4 minutes each)
    assert closing < 2 + 1 + 2, closing  # flush_timeout, the last join, a busy machine's slack
    spool = TrackingSpool(tmp_path / "tracking")
    pending = [record for record, _ in spool.pending()]
    assert [r["step"] for r in pending if r["op"] == "metrics"] == list(range(1, 201))
    assert pending[-1] == {"op": "end", "status": "FINISHED", "ts": pending[-1]["ts"]}
    assert tracker.run_id is None


def test_a_torn_last_record_is_dropped_a_resume_continues_the_spool_and_a_fresh_start_sets_it_aside(tmp_path, monkeypatch):
    """No server at all (a port nobody listens on). A process killed in the middle of a write
    leaves a partial line: the next start drops it. A resumed start continues the spool (the same
    key: the same MLflow run once created; params not logged again); a fresh start in the same
    directory keeps the earlier records aside for pipeline-sync and begins a new spool."""
    from tests.servers import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")  # restored after the test (see above)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    options = dict(active=True, tracking_uri=f"http://127.0.0.1:{free_port()}", run_dir=tmp_path, flush_timeout=0.5)
    first = Tracker(**options, new_run=True)
    first.log_params({"train.steps": 3})
    first.log_metrics({"train/loss": 1.0}, 1)
    first.close("KILLED")
    records = tmp_path / "tracking" / "spool.jsonl"
    with open(records, "a") as f:
        f.write('{"op":"metrics","step":2,"ts":1,"metr')  # the write a kill cut short
    key = json.loads((tmp_path / "tracking" / "run.json").read_text())["key"]

    resumed = Tracker(**options)
    assert resumed.resumed
    resumed.log_params({"train.steps": 3})  # a resumed run keeps its first start's params
    resumed.log_metrics({"train/loss": 0.5}, 2)
    resumed.close("FINISHED")
    lines = [json.loads(line) for line in records.read_text().splitlines()]  # every line whole
    assert [r["op"] for r in lines] == ["start", "params", "metrics", "end", "start", "metrics", "end"]
    assert [r["step"] for r in lines if r["op"] == "metrics"] == [1, 2]
    assert json.loads((tmp_path / "tracking" / "run.json").read_text())["key"] == key

    earlier = records.read_text()
    fresh = Tracker(**options, new_run=True)
    assert not fresh.resumed
    fresh.close()
    (aside,) = tmp_path.glob("tracking.*")
    assert (aside / "spool.jsonl").read_text() == earlier and TrackingSpool(aside).count_pending() == 7
    assert json.loads((tmp_path / "tracking" / "run.json").read_text())["key"] != key
    assert [json.loads(line)["op"] for line in records.read_text().splitlines()] == ["start", "end"]


def test_records_logged_while_the_uploader_finds_the_spool_empty_are_uploaded_by_close(tmp_path, monkeypatch):
    """The uploader thread reads the spool as empty; before it acts on that, the training thread
    logs a tag and closes. close() must still upload the tag: the thread may only stop on an empty
    spool it read *after* it saw the run closing. Made deterministic by holding the thread
    between its read and its decision until close() has set its flag."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = Tracker(active=True, tracking_uri=uri, experiment="race", run_dir=tmp_path, new_run=True,
                      system_metrics_interval=0)  # fmt: skip
    read_empty, real = threading.Event(), TrackingSpool.pending_bytes

    def pending_bytes_then_hold(spool):
        value = real(spool)
        if value <= 0 and threading.current_thread().name == "tracking-upload" and not read_empty.is_set():
            read_empty.set()
            assert tracker._closing.wait(10), "close() never came"
        return value

    monkeypatch.setattr(TrackingSpool, "pending_bytes", pending_bytes_then_hold)
    assert read_empty.wait(10), "the uploader never found the spool empty"
    tracker.set_tags({"logged_at_the_end": "yes"})
    tracker.close("FINISHED")
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert run.data.tags.get("logged_at_the_end") == "yes" and run.info.status == "FINISHED"
    assert TrackingSpool(tmp_path / "tracking").count_pending() == 0
