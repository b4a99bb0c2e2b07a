"""Sends a tracking spool's records (pipeline/tracking_spool.py) to MLflow, in order, acknowledging
each batch once the store has it: the trainer's background thread and ``pipeline-sync`` both use it.

A failure that can pass (the server down or slow, a 5xx, a 429) raises and leaves the records
for the next try; one the store will refuse every time (a 4xx: a param logged again with another
value, a missing staged file) is logged and skipped, so that it cannot hold the rest back.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

from pipeline.tracking_spool import TrackingSpool

log = logging.getLogger(__name__)

SPOOL_TAG = "hvae.spool"  # the spool's key on its MLflow run: finds the run a lost reply created
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_OR_TAGS_PER_BATCH = 100
READ_AHEAD = 5000  # records read from the spool at a time


def configure_http(request_timeout: int) -> None:
    """MLflow's client retries each request up to 7 times with backoff (~4 minutes) and waits
    120 s for an answer by default. The spool retries instead, so MLflow's retries are off and
    its wait bounded (its environment variables, read at each request: this process only)."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(request_timeout))


def is_local_store(uri: str) -> bool:
    """SQLite or a directory: no server between us and the store, never "down"."""
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def is_permanent(exn: BaseException) -> bool:
    """The store answered and refused: sending the same again would fail again."""
    from mlflow.exceptions import MlflowException

    if isinstance(exn, (FileNotFoundError, NotADirectoryError)):
        return True
    if not isinstance(exn, MlflowException):
        return False
    status = exn.get_http_status_code()
    return 400 <= status < 500 and status != 429


class Uploader:
    """Uploads ``spool`` to ``tracking_uri`` (default: the one the spool was begun with)."""

    def __init__(self, spool: TrackingSpool, tracking_uri: str | None = None) -> None:
        from mlflow import MlflowClient

        self.spool = spool
        self.uri = tracking_uri or spool.run_state()["tracking_uri"]
        self.client = MlflowClient(tracking_uri=self.uri)
        self.checked_run: str | None = None
        self.sent: Counter = Counter()  # records, metric points, artifacts, skipped

    # --- the run -----------------------------------------------------------------------------

    def ensure_run(self) -> str:
        """The spool's MLflow run id, creating the run on first contact (and once more if the
        store no longer has it); recorded in ``run.json``."""
        state = self.spool.run_state()
        run_id = state.get("run_id")
        if run_id and run_id != self.checked_run:
            try:
                self.client.get_run(run_id)
            except Exception as exn:
                if not is_permanent(exn):
                    raise
                log.warning("MLflow run %s not found at %s; the records not yet uploaded go to a new run", run_id, self.uri)
                run_id = None
        if not run_id:
            run_id = self._create_run(state)
            self.spool.write_run_state({**state, "run_id": run_id, "tracking_uri": self.uri})
            log.info("MLflow run %s created at %s", run_id, self.uri)
        self.checked_run = run_id
        return run_id

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # Local stores keep artifacts beside the database, inside the run directory; a server
        # decides for itself where artifacts go.
        local = is_local_store(self.uri)
        location = (self.spool.directory.parent.resolve() / "mlartifacts").as_uri() if local else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception as exn:
            found = self.client.get_experiment_by_name(name)  # another run created it meanwhile
            if found is None:
                raise exn from None
            return found.experiment_id

    def _create_run(self, state: dict[str, Any]) -> str:
        experiment_id = self._experiment_id(state["experiment"])
        existing = self.client.search_runs([experiment_id], filter_string=f"tags.`{SPOOL_TAG}` = '{state['key']}'",
                                           max_results=1)  # fmt: skip
        if existing:
            return existing[0].info.run_id
        run = self.client.create_run(experiment_id, run_name=state.get("run_name") or None, tags={SPOOL_TAG: state["key"]})
        return run.info.run_id

    # --- the records -------------------------------------------------------------------------

    def upload(self) -> None:
        """Every record written so far; raises on a failure that can pass (those sent before it
        stay acknowledged)."""
        run_id = self.ensure_run()
        while True:
            records = list(self.spool.pending(limit=READ_AHEAD))
            if not records:
                return
            while records:
                group = _next_group(records)
                del records[: len(group)]
                self._send(run_id, group)
                self.spool.acknowledge(group[-1][1])
                for record, _ in group:
                    if record["op"] == "artifact":
                        self.spool.forget_artifact(record["path"])

    def _send(self, run_id: str, group: list[tuple[dict[str, Any], int]]) -> None:
        try:
            self._send_now(run_id, [record for record, _ in group])
        except Exception as exn:
            if not is_permanent(exn):
                raise
            if len(group) > 1:  # find the one the store refuses; send the others
                for one in group:
                    self._send(run_id, [one])
                return
            self.sent["skipped"] += 1
            log.warning("the tracking store refused a %s record; skipped: %s", group[0][0]["op"], exn)

    def _send_now(self, run_id: str, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, op = self.client, records[0]["op"]
        if op == "metrics":
            metrics = [Metric(k, float(v), r["ts"], r["step"]) for r in records for k, v in r["metrics"].items()]
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
            self.sent["metric points"] += len(metrics)
        elif op in ("params", "tags"):
            items = list(records[0][op].items())
            for i in range(0, len(items), MAX_PARAMS_OR_TAGS_PER_BATCH):
                chunk = items[i : i + MAX_PARAMS_OR_TAGS_PER_BATCH]
                if op == "params":
                    client.log_batch(run_id, params=[Param(k, v) for k, v in chunk])
                else:
                    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in chunk])
        elif op == "artifact":
            path = self.spool.directory / records[0]["path"]
            if not path.exists():
                raise FileNotFoundError(f"the staged copy {path} is gone")
            if path.is_dir():
                client.log_artifacts(run_id, str(path), records[0]["artifact_path"])
            else:
                client.log_artifact(run_id, str(path), records[0]["artifact_path"])
            self.sent["artifacts"] += 1
        elif op == "start":
            client.update_run(run_id, status="RUNNING")
        elif op == "end":
            client.set_terminated(run_id, status=records[0]["status"], end_time=records[0]["ts"])
        else:
            raise ValueError(f"unknown tracking record {op!r}")
        self.sent["records"] += len(records)


def _next_group(records: list[tuple[dict[str, Any], int]]) -> list[tuple[dict[str, Any], int]]:
    """Consecutive metric records up to MLflow's batch limit go in one request; anything else alone."""
    if records[0][0]["op"] != "metrics":
        return records[:1]
    group, points = [], 0
    for record, offset in records:
        if record["op"] != "metrics" or (group and points + len(record["metrics"]) > MAX_METRICS_PER_BATCH):
            break
        group.append((record, offset))
        points += len(record["metrics"])
    return group
