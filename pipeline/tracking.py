"""MLflow on the main process only; every other process gets a tracker that does nothing.

A tracking failure (server down, disk full) is logged and training goes on: losing a few
metric points is better than losing the run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def resolve_tracking_uri(configured: str, run_dir: Path) -> str:
    """Config first, then ``$MLFLOW_TRACKING_URI``, then SQLite under the run directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


class Tracker:
    """One MLflow run. ``active`` is False on non-main processes and when tracking is off."""

    def __init__(
        self,
        *,
        active: bool,
        tracking_uri: str = "",
        experiment: str = "hvae",
        run_name: str = "",
        run_dir: Path = Path("."),
        resume_run_id: str | None = None,
    ) -> None:
        self.active = active
        self.run_id: str | None = None
        self.resumed = False
        if not active:
            return
        import mlflow

        self.mlflow = mlflow
        uri = resolve_tracking_uri(tracking_uri, run_dir)
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        found = client.get_experiment_by_name(experiment)
        if found is None:
            # Local stores keep artifacts beside the database, inside the run directory; a
            # server decides for itself where artifacts go.
            local = uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri
            location = (run_dir.resolve() / "mlartifacts").as_uri() if local else None
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        else:
            experiment_id = found.experiment_id
        if resume_run_id is not None:
            try:
                client.get_run(resume_run_id)
                self.resumed = True
            except Exception:
                log.warning("MLflow run %s not found at %s; starting a new run", resume_run_id, uri)
                resume_run_id = None
        run = mlflow.start_run(run_id=resume_run_id, experiment_id=experiment_id, run_name=run_name or None)
        self.run_id = run.info.run_id
        log.info("MLflow run %s at %s", self.run_id, uri)

    def _safely(self, function: str, *args, **kwargs) -> None:
        """Call ``mlflow.<function>`` on the main process; log a failure instead of raising."""
        if not self.active:
            return
        try:
            getattr(self.mlflow, function)(*args, **kwargs)
        except Exception as exn:  # tracking must never kill training
            log.warning("MLflow %s failed, training goes on: %r", function, exn)

    def log_params(self, params: dict[str, Any]) -> None:
        # Params are immutable in MLflow: a resumed run keeps those of its first start.
        if not self.resumed:
            self._safely("log_params", {k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._safely("log_metrics", metrics, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._safely("set_tags", {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a directory's contents, under ``artifact_path`` in the run."""
        self._safely("log_artifacts" if Path(path).is_dir() else "log_artifact", str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        self._safely("end_run", status=status)
