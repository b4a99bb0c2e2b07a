"""One launch per run directory: an exclusive ``flock`` on ``<run_dir>/.lock``, held for the run's life.

Two launches on one ``train.run_dir`` (a job submitted twice, a requeue while the old job still
runs) would write checkpoints over each other and both resume from whichever they find. The main
process takes the lock before anything is written into the directory; a second launch is refused
at once, naming who holds it (host, pid, start time, written into the lock file by the holder).

The kernel releases a ``flock`` when its holder's last file descriptor closes, which includes a
process killed with SIGKILL or a node rebooted. So no stale lock file ever blocks a rerun: the
file stays, but nobody holds it. Forked children (DataLoader workers) inherit the descriptor and
would keep the lock alive after the trainer died; they close their copy right after the fork.

``flock`` works on local disks, on NFS (Linux maps it to NFS byte-range locks, unless the share
is mounted with ``local_lock=flock`` or ``nolock``) and on Lustre mounted with ``-o flock``. A file
system that refuses locks gets a warning and the run goes on unprotected.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunDirInUse(RuntimeError):
    """Another live launch holds the run directory's lock."""


class RunDirLock:
    """The exclusive lock of one run directory, as an open file descriptor."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self._pid = os.getpid()  # the process that holds it (a forked child does not)

    def acquire(self) -> None:
        """Take the lock, or raise RunDirInUse naming its holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A raw descriptor, not a file object: a child must be able to close its copy without
        # a garbage-collected file object closing the same number again later.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirInUse(
                f"run dir {self.run_dir} is in use by {holder}; wait for it, stop it, or choose another train.run_dir"
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                log.warning("cannot lock %s (%s): this file system does not support flock (Lustre without "
                            "-o flock, NFS with nolock?); a second launch on this run dir will not be refused",
                            self.path, err.strerror)  # fmt: skip
                return
            raise
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self.fd = fd
        os.register_at_fork(after_in_child=self._close_in_child)

    def _close_in_child(self) -> None:
        # Closing a copy of the descriptor never unlocks (the parent's copy stays open); it only
        # stops this child from holding the lock after the parent is gone. Never LOCK_UN here.
        if self.fd is not None and os.getpid() != self._pid:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        """Unlock (the file stays: removing it could let two launches lock two different files)."""
        if self.fd is not None and os.getpid() == self._pid:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """Who holds the lock, from the record it wrote: "pid P on host H since T"."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {record['pid']} on host {record['host']} since {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        # The holder locks first and writes its record just after: caught in between.
        return "another launch (it has not written who it is yet)"


def hold_run_dir(run_dir: str | Path, accelerator) -> RunDirLock:
    """On every process of a launch: the main process takes the run directory's lock; when it is
    refused, every process raises RunDirInUse with its message (a collective, so no other rank
    goes on to touch the directory of the run that holds it). Call before anything is written."""
    lock = RunDirLock(run_dir)
    refusal = ""
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except RunDirInUse as err:
            refusal = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal], from_process=0)[0]
    if refusal:
        raise RunDirInUse(refusal)
    return lock
