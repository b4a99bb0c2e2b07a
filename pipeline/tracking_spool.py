"""The tracking spool: what the run sends to MLflow, kept on local disk first, in order.

``<run_dir>/tracking/`` holds
- ``spool.jsonl``: one JSON record a line (``start``, ``params``, ``tags``, ``metrics``,
  ``artifact``, ``end``), appended with one write each, never rewritten;
- ``uploaded.json``: how far the spool has been acknowledged by the tracking store (a byte
  offset, replaced atomically after each upload), so nothing is sent twice and nothing skipped;
- ``run.json``: the tracking URI, experiment and run name, and the MLflow run id once the run
  exists (it is created when the store is first reachable), so a resumed job continues it;
- ``artifacts/``: copies of logged files taken when they were logged (the originals may be
  rewritten, e.g. the final report of a rerun), deleted once uploaded;
- ``upload.lock``: held (flock) by the one process that uploads, the trainer or ``pipeline-sync``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

SPOOL_DIR = "tracking"


def spool_dir(path: Path) -> Path:
    """The spool of a run directory, or ``path`` itself when it is a spool directory."""
    path = Path(path)
    return path if (path / "spool.jsonl").exists() or (path / "run.json").exists() else path / SPOOL_DIR


def now_ms() -> int:
    return int(time.time() * 1000)


class TrackingSpool:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.records_file = self.directory / "spool.jsonl"
        self.ack_file = self.directory / "uploaded.json"
        self.run_file = self.directory / "run.json"
        self.artifacts = self.directory / "artifacts"
        self._append_lock = threading.Lock()  # the training thread and the system metrics sampler
        self._fd: int | None = None
        self._lock_fd: int | None = None

    # --- the run -----------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.run_file.exists()

    def run_state(self) -> dict[str, Any]:
        return json.loads(self.run_file.read_text()) if self.run_file.exists() else {}

    def write_run_state(self, state: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _replace_json(self.run_file, state)

    def create(self, tracking_uri: str, experiment: str, run_name: str, run_id: str | None) -> None:
        """A new spool; ``key`` names it on the MLflow run (a tag), so that creating the run again
        after a reply was lost finds the first one instead of making a second."""
        self.write_run_state({"tracking_uri": tracking_uri, "experiment": experiment, "run_name": run_name,
                              "run_id": run_id, "key": uuid.uuid4().hex})  # fmt: skip

    # --- writing (the training process) ----------------------------------------------------------

    def append(self, record: dict[str, Any]) -> None:
        """One record, in one write to a file opened for appending: a crash leaves at most a
        partial last line, which ``repair`` drops."""
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._append_lock:
            if self._fd is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.records_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(self._fd, line)

    def stage_artifact(self, path: Path) -> str:
        """A copy of ``path`` (a file or a directory) under ``artifacts/``; its path relative to the spool."""
        path = Path(path)
        target = self.artifacts / uuid.uuid4().hex / path.name
        target.parent.mkdir(parents=True)
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
        return str(target.relative_to(self.directory))

    def repair(self) -> None:
        """Drop a partial last line (a process killed in the middle of a write)."""
        if not self.records_file.exists():
            return
        with open(self.records_file, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(max(0, size - 65536))
            tail = f.read()
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            f.truncate(size - len(tail) + cut + 1 if cut >= 0 else 0)

    def close(self) -> None:
        with self._append_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # --- reading and acknowledging (the uploader) ----------------------------------------------

    def acknowledged(self) -> int:
        """Bytes of the spool the tracking store has."""
        return json.loads(self.ack_file.read_text())["offset"] if self.ack_file.exists() else 0

    def acknowledge(self, offset: int) -> None:
        _replace_json(self.ack_file, {"offset": offset, "at": now_ms()})

    def pending_bytes(self) -> int:
        size = self.records_file.stat().st_size if self.records_file.exists() else 0
        return size - self.acknowledged()

    def pending(self, limit: int | None = None) -> Iterator[tuple[dict[str, Any], int]]:
        """Each record not yet acknowledged with the offset just after it, at most ``limit``;
        only whole lines (the writer may be in the middle of one)."""
        if not self.records_file.exists():
            return
        offset = self.acknowledged()
        count = 0
        with open(self.records_file, "rb") as f:
            f.seek(offset)
            for line in f:
                if not line.endswith(b"\n") or (limit is not None and count >= limit):
                    return
                offset += len(line)
                count += 1
                yield json.loads(line), offset

    def count_pending(self) -> int:
        return sum(1 for _ in self.pending())

    def last_step(self, prefix: str) -> int | None:
        """The largest step of metrics whose names start with ``prefix``, over the whole spool."""
        if not self.records_file.exists():
            return None
        needle, last = f'"{prefix}'.encode(), None
        with open(self.records_file, "rb") as f:
            for line in f:
                if needle in line and line.endswith(b"\n"):
                    record = json.loads(line)
                    if record.get("op") == "metrics" and any(k.startswith(prefix) for k in record["metrics"]):
                        last = record["step"] if last is None else max(last, record["step"])
        return last

    def forget_artifact(self, relative: str) -> None:
        """The staged copy, once uploaded."""
        shutil.rmtree((self.directory / relative).parent, ignore_errors=True)

    # --- one uploader at a time ---------------------------------------------------------------

    def try_lock(self) -> bool:
        """Take the upload lock (held until ``unlock`` or the process ends); False when another
        process holds it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "upload.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _replace_json(path: Path, value: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value) + "\n")
    os.replace(temporary, path)
