"""Stopping a run early without losing it: on a signal or at a time limit, at a step boundary.

A cluster ends a job with a signal: SLURM and Kubernetes send SIGTERM (then SIGKILL after a
grace period), ``sbatch --signal=USR1@120`` sends SIGUSR1 two minutes before the time limit, a
person presses Ctrl-C (SIGINT). Each of those in ``train.stop_signals`` only sets a flag here.
The trainer asks ``should_stop`` once per optimizer step, at the step boundary, and every
process agrees on the answer (the largest request over the ranks, one tiny all-reduce), so
they all stop after the same step. The run then writes a checkpoint of that step (the usual
save, ZeRO included), closes its MLflow run as KILLED and exits with ``EXIT_RESUMABLE`` (75,
EX_TEMPFAIL): "stopped early, checkpoint written, resume by rerunning the same command".

A signal that arrives in the middle of a step, an evaluation, a checkpoint write or a batch
being read changes nothing there: Python runs the handler between two bytecodes of the main
thread, the handler returns, the interrupted work goes on (system calls are retried, PEP 475),
and the flag is read at the next boundary. ``train.time_limit`` sets the same flag from rank
0's clock, so no two ranks can disagree about the time.

A second SIGINT, a second or more after the first, exits at once with 130 and no checkpoint: a
person who presses Ctrl-C again does not want to wait. (The same SIGINT can reach a rank
twice, from a cluster that signals every process of a job step and again from torchrun, which
forwards its own copy; within a second it counts once.) Any number of SIGTERM or SIGUSR1 count
once, for the same reason.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXIT_RESUMABLE = 75  # EX_TEMPFAIL (sysexits.h): stopped early, checkpoint written, rerun to resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C: the second SIGINT
STOPPED_FILE = "stopped.json"  # in the run directory: "this run stopped early, resumable" (see write_stopped)

SIGNAL_NAMES = ("TERM", "INT", "USR1", "USR2", "HUP")  # what train.stop_signals may name
REPEAT_WINDOW_S = 1.0  # a SIGINT within this of the first is the same one, delivered twice
TIME_LIMIT = 1000  # the request code of train.time_limit; a signal's code is its number (1..64)


def reason(code: int) -> str:
    """A request code as words: ``SIGTERM``, ``train.time_limit``."""
    if code == TIME_LIMIT:
        return "train.time_limit"
    return signal.Signals(code).name


class TrainingStopped(Exception):
    """Raised by the trainer after the checkpoint of ``step`` is written; train.py exits with 75."""

    def __init__(self, code: int, step: int) -> None:
        self.code, self.step = code, step
        super().__init__(f"stopped after step {step} ({reason(code)}); rerun the same command to resume")


class StopRequests:
    """The flag the signal handlers and the clock set, and the agreement over the ranks.

    Made once per process, as early as possible (``train.py``, right after the config is read),
    so that a signal during set-up is kept too, and the time limit counts from the start.
    """

    def __init__(self, signal_names: list[str] | tuple[str, ...] = (), time_limit_s: float | None = None,
                 main_process: bool = True, clock=time.monotonic, hold: tuple[int, float] | None = None) -> None:  # fmt: skip
        self.signals = [getattr(signal, f"SIG{name}") for name in dict.fromkeys(signal_names)]
        self.time_limit_s = time_limit_s
        self.clock, self.started = clock, clock()
        self.main_process = main_process  # whose clock applies the time limit
        self.code = 0  # this process's request: 0 none, else a signal number or TIME_LIMIT
        self._first_sigint: float | None = None
        self._first_step: int | None = None  # the step this process started at
        self.stepped = False  # whether this process made a step (the time limit waits for one)
        self._previous: dict[int, Any] = {}
        self._hold = hold  # (step, seconds): faults.hold_at_step, for tests only

    # --- signals ------------------------------------------------------------------------------

    def install(self) -> None:
        """Handle ``train.stop_signals`` from now on (main thread only, as Python requires)."""
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        # Runs in the main thread between two bytecodes, possibly inside a print or a logging
        # call: os.write, which takes no lock and has no buffer, is the safe way to say something.
        now = self.clock()
        if number == signal.SIGINT:
            if self._first_sigint is not None and now - self._first_sigint > REPEAT_WINDOW_S:
                _say(f"second SIGINT: exiting at once without a checkpoint (exit {EXIT_INTERRUPTED})")
                os._exit(EXIT_INTERRUPTED)
            if self._first_sigint is None:
                self._first_sigint = now
        if self.code == 0:
            self.code = number
            _say(f"received {reason(number)}: stopping after the current step with a checkpoint "
                 f"(exit {EXIT_RESUMABLE}; rerun the same command to resume)"
                 + ("; Ctrl-C again to exit at once without one" if number == signal.SIGINT else ""))  # fmt: skip

    # --- the decision -------------------------------------------------------------------------

    def local_code(self) -> int:
        """This process's request: a signal it received, else (main process only, after at least
        one step here, so that a requeued job always makes progress) the time limit."""
        if self.code:
            return self.code
        if (self.main_process and self.time_limit_s is not None and self.stepped
                and self.clock() - self.started >= self.time_limit_s):  # fmt: skip
            self.code = TIME_LIMIT
        return self.code

    def should_stop(self, accelerator, step: int) -> int:
        """At a step boundary, on every process at once (a collective when there are several):
        the request code every rank agrees on, 0 to go on."""
        if self._first_step is None:
            self._first_step = step
        self.stepped = step > self._first_step
        if self._hold is not None and step == self._hold[0] and self.stepped:
            self._wait_for_a_request(accelerator, step)
        return self.agree(accelerator, self.local_code())

    @staticmethod
    def agree(accelerator, code: int) -> int:
        """The largest request code over all processes (each contributes its own)."""
        if accelerator.num_processes == 1:
            return code
        import torch
        import torch.distributed as dist

        flag = torch.tensor([code], dtype=torch.int32, device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def _wait_for_a_request(self, accelerator, step: int) -> None:
        """The test hold (``faults.hold_at_step``): all ranks wait here, agreeing every 50 ms, until one
        of them has a request (at most 300 s), then ``seconds`` more."""
        _, extra = self._hold
        _say(f"test hold at step {step}: waiting for a stop request")
        deadline = time.monotonic() + 300
        while not self.agree(accelerator, self.local_code()) and time.monotonic() < deadline:
            time.sleep(0.05)
        end = time.monotonic() + extra
        while time.monotonic() < end:
            time.sleep(0.05)


def _stop_signal_numbers() -> set[int]:
    return {getattr(signal, f"SIG{name}") for name in SIGNAL_NAMES}


def ignore_stop_signals() -> None:
    """In a data-loading worker: the training process decides when to stop. A worker killed by
    a signal sent to its whole process group (Ctrl-C, ``scancel``, torchrun forwarding to a
    rank's group) would make torch fail the training process before it could checkpoint. The
    worker was started with these signals blocked (``stop_signals_blocked``): ignored first,
    then unblocked, none that arrived in between can kill it."""
    numbers = _stop_signal_numbers()
    for number in numbers:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, numbers)


def exit_with_parent(parent: int) -> None:
    """In a data-loading worker forked by process ``parent``: die when it dies, whatever the
    worker is doing. Torch's workers notice a dead parent only between tasks, and then wait at
    exit for their result queue's feeder thread, blocked for good once unread messages fill the
    pipe (two 4 MB messages of small batches carry ~90 KB of keys and counts; the pipe holds
    64 KB, and every worker, itself included, keeps its reading end open): killed with SIGKILL,
    a trainer left its workers behind. Linux's parent-death signal ends them with it (the
    parent being the thread that forked them, the training process's main thread here);
    elsewhere nothing is done."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(0)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Around the start of worker processes, which inherit the blocked mask (see above). The
    training process itself still gets its signals: CPython runs the handler in the main thread
    whichever thread the kernel delivers to, and any pending here arrive when this ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _stop_signal_numbers())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def write_stopped(run_dir: Path, code: int, step: int, checkpoint: Path) -> None:
    """``<run_dir>/stopped.json``: the early stop, for a job script to see. ``accelerate launch``
    does not pass exit code 75 on (a rank's non-zero exit becomes its own 1, and a signal to the
    launcher 128 + the signal), so a requeue script reads this file instead; the next start of
    the run removes it."""
    record = {"exit_code": EXIT_RESUMABLE, "reason": reason(code), "step": step, "checkpoint": str(checkpoint),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    path = Path(run_dir) / STOPPED_FILE
    tmp = path.with_name(f".{STOPPED_FILE}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def clear_stopped(run_dir: Path) -> None:
    (Path(run_dir) / STOPPED_FILE).unlink(missing_ok=True)


def _say(message: str) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None else ""
    try:
        os.write(2, f"{prefix}{message}\n".encode())
    except OSError:
        pass

