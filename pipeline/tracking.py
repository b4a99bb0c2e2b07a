"""MLflow on the main process only; every other process gets a tracker that does nothing.

The training thread never waits on MLflow. Every call (params, tags, metrics, artifacts, the
end) is first appended to the run's tracking spool on local disk (``<run_dir>/tracking/``,
pipeline/tracking_spool.py); a background thread uploads it in order and records what the store
has acknowledged (pipeline/tracking_upload.py). A server that is down, at the start or mid-run,
costs the training nothing: the thread retries with backoff, creates the MLflow run when the
server first answers, and sends everything logged meanwhile once it is back. At the end the
tracker waits ``tracking.flush_timeout`` seconds at most for the spool to be uploaded and leaves
the rest there for ``pipeline-sync <run_dir>`` (pipeline/sync.py).

A local store (SQLite, the default) is never down: its run is created or reopened at once, as
before, and its records go through the same spool.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.tracking_spool import SPOOL_DIR, TrackingSpool, now_ms

log = logging.getLogger(__name__)

RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0  # the uploader's backoff while the store is unreachable
IDLE_POLL_S = 1.0
# At most one upload round a second: a run logging every step of 0.1 s sends one request of ten
# steps instead of ten (less work for the training process's CPU and for the server).
UPLOAD_INTERVAL_S = 1.0


def resolve_tracking_uri(configured: str, run_dir: Path) -> str:
    """Config first, then ``$MLFLOW_TRACKING_URI``, then SQLite under the run directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


class Tracker:
    """One MLflow run. ``active`` is False on non-main processes and when tracking is off.

    ``resume_run_id``: the run a checkpoint names (run directories from before the spool).
    ``new_run``: a training run starting from scratch: a spool left in ``run_dir`` by an earlier
    attempt is set aside (kept for ``pipeline-sync`` when it still holds records) and a new MLflow
    run begins; otherwise the spool's run is continued (a resumed job, ``pipeline-eval``).
    """

    def __init__(
        self,
        *,
        active: bool,
        tracking_uri: str = "",
        experiment: str = "hvae",
        run_name: str = "",
        run_dir: Path = Path("."),
        resume_run_id: str | None = None,
        new_run: bool = False,
        flush_timeout: float = 60.0,
        request_timeout: int = 10,
        system_metrics_interval: float = 0.0,
    ) -> None:
        self.active = active
        self.resumed = False
        self.closed = False
        if not active:
            return
        from pipeline.tracking_upload import Uploader, configure_http, is_local_store

        configure_http(request_timeout)
        self.uri, self.run_dir = resolve_tracking_uri(tracking_uri, run_dir), Path(run_dir)
        self.flush_timeout = flush_timeout
        self.spool = TrackingSpool(self.run_dir / SPOOL_DIR)
        if new_run and self.spool.directory.exists():
            self._set_aside_earlier_spool()
        state = self.spool.run_state()
        if state:
            self.resumed = True
            if not state.get("run_id") and resume_run_id:
                state["run_id"] = resume_run_id
            if state["tracking_uri"] != self.uri:
                log.warning("tracking URI changed from %s to %s: the run's records not yet uploaded go there",
                            state["tracking_uri"], self.uri)  # fmt: skip
                state["tracking_uri"] = self.uri
            self.spool.write_run_state(state)
        else:
            self.spool.create(self.uri, experiment, run_name, resume_run_id)
            self.resumed = resume_run_id is not None
        # One uploader per spool: another process holding it (a pipeline-sync) sends ours too.
        self.uploader = Uploader(self.spool, self.uri) if self.spool.try_lock() else None
        if self.uploader is not None:
            self.spool.repair()
        self.spool.append({"op": "start", "ts": now_ms()})
        if self.uploader is not None and is_local_store(self.uri):
            self._open_local_run()
        self._wake, self._closing, self._give_up = threading.Event(), threading.Event(), threading.Event()
        self._thread = None
        if self.uploader is not None:
            self._thread = threading.Thread(target=self._upload_in_background, name="tracking-upload", daemon=True)
            self._thread.start()
        else:
            log.warning("another process is uploading %s; this one only appends to it", self.spool.directory)
        self.sampler = None
        if system_metrics_interval > 0:
            from pipeline.system_metrics import PREFIX, SystemMetricsSampler

            last = self.spool.last_step(PREFIX) if self.resumed else None
            self.sampler = SystemMetricsSampler(self.log_metrics, system_metrics_interval, 0 if last is None else last + 1)
            self.sampler.start()
        log.info("MLflow run %s at %s (records spooled in %s)", self.run_id or "(created when the server answers)",
                 self.uri, self.spool.directory)  # fmt: skip

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id; None until the run exists (a server down since the start)."""
        return self.spool.run_state().get("run_id") if self.active else None

    def _set_aside_earlier_spool(self) -> None:
        earlier = TrackingSpool(self.spool.directory)
        if earlier.exists() and earlier.pending_bytes() > 0:
            kept = self.spool.directory.with_name(f"{SPOOL_DIR}.{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.spool.directory, kept)
            log.warning("an earlier start's tracking records were not all uploaded: kept in %s "
                        "(`pipeline-sync %s` uploads them to that start's MLflow run)", kept, kept)  # fmt: skip
        else:
            shutil.rmtree(self.spool.directory)

    def _open_local_run(self) -> None:
        """A local store answers at once: create or reopen the run now (the run id is known from
        the start, as before), sending what an earlier start left in the spool."""
        checked = self.spool.run_state().get("run_id")
        try:
            self.uploader.upload()
        except Exception as exn:
            log.warning("MLflow store %s failed, training goes on (the background uploader retries): %r", self.uri, exn)
            return
        if checked and self.run_id != checked:
            self.resumed = False  # the store had lost the run: the new one needs the params

    # --- the uploader thread -----------------------------------------------------------------------

    def _upload_in_background(self) -> None:
        delay, failing = RETRY_FIRST_S, False
        while not self._give_up.is_set():
            # Read "closing" before the spool's size: close() appends its last record before it
            # sets the flag, so a flag seen set means that size holds every record. (The other
            # order lost records appended between the two reads.)
            closing = self._closing.is_set()
            if self.spool.pending_bytes() <= 0:
                if closing:
                    return
                self._wake.wait(IDLE_POLL_S)
                self._wake.clear()
                continue
            try:
                self.uploader.upload()
            except Exception as exn:
                if not failing:
                    log.warning("MLflow at %s unreachable (%s); training goes on, its records are kept in %s "
                                "and sent when the server is back", self.uri, _first_line(exn),
                                self.spool.directory)  # fmt: skip
                    failing = True
                self._give_up.wait(delay)  # not woken by new records: the server gets its pause
                delay = min(2 * delay, RETRY_MAX_S)
                continue
            if failing:
                log.info("MLflow at %s reachable again; the records kept meanwhile are uploaded", self.uri)
                failing = False
            delay = RETRY_FIRST_S
            self._closing.wait(UPLOAD_INTERVAL_S)  # the end of the run does not wait for it

    # --- the API -----------------------------------------------------------------------------------

    def _spool(self, record: dict[str, Any]) -> None:
        """Append ``record``; a failure (disk full) is logged and training goes on."""
        if not self.active or self.closed:
            return
        try:
            self.spool.append(record)
        except Exception as exn:  # tracking must never kill training
            log.warning("tracking record %s not kept, training goes on: %r", record.get("op"), exn)
            return
        self._wake.set()

    def log_params(self, params: dict[str, Any]) -> None:
        # Params are immutable in MLflow: a resumed run keeps those of its first start.
        if not self.resumed:
            self._spool({"op": "params", "params": {k: str(v) for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        try:
            values = {k: float(v) for k, v in metrics.items()}
        except (TypeError, ValueError) as exn:
            log.warning("metrics at step %s not logged, training goes on: %r", step, exn)
            return
        self._spool({"op": "metrics", "step": int(step), "ts": now_ms(), "metrics": values})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._spool({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a directory's contents, under ``artifact_path`` in the run. Copied into the
        spool now: the file may be rewritten before it is uploaded."""
        if not self.active or self.closed:
            return
        try:
            staged = self.spool.stage_artifact(Path(path))
        except Exception as exn:
            log.warning("artifact %s not kept, training goes on: %r", path, exn)
            return
        self._spool({"op": "artifact", "path": staged, "artifact_path": artifact_path})

    def close(self, status: str = "FINISHED") -> None:
        """End the run: wait ``flush_timeout`` seconds at most for the spool to be uploaded, and
        say what is left for ``pipeline-sync``."""
        if not self.active or self.closed:
            return
        if self.sampler is not None:
            self.sampler.stop()
        self._spool({"op": "end", "status": status, "ts": now_ms()})
        self.closed = True
        if self._thread is None:
            self.spool.close()
            return
        self._closing.set()
        self._wake.set()
        self._thread.join(self.flush_timeout)
        if self._thread.is_alive():
            self._give_up.set()
            self._thread.join(1.0)  # in the middle of a request: it ends with the process
        self.spool.close()
        left = self.spool.count_pending()
        if left:
            log.warning("%d tracking records not uploaded; run `pipeline-sync %s` when the server is back (%s)",
                        left, self.run_dir, self.uri)  # fmt: skip
        if not self._thread.is_alive():
            self.spool.unlock()


def _first_line(exn: BaseException) -> str:
    text = str(exn).strip()
    return text.splitlines()[0][:300] if text else repr(exn)
