"""Training progress as a person reads it: a bar on a terminal, plain lines in a log file.

Under ``sbatch`` (or ``nohup``, or any redirect) the output is a file, and a progress bar there
is a carriage return per update: the log becomes one line of megabytes with the messages buried
in it. So the bar is drawn only on a stream that is a terminal: stderr, else stdout (``accelerate
launch`` with one process pipes the training process's stderr through itself, but leaves its
stdout on the terminal). With neither, a plain line goes to the log every
``train.progress_every`` seconds::

    2026-12-03 10:15:42,118 INFO pipeline.progress: step 1200/8000 (15%), loss 3.912, 1,873 images/s, ETA 1h02m
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def terminal_stream() -> TextIO | None:
    """The stream to draw a bar on: stderr or stdout, whichever is a terminal; None if neither."""
    for stream in (sys.stderr, sys.stdout):
        try:
            if stream is not None and stream.isatty():
                return stream
        except (AttributeError, ValueError):  # replaced or closed streams
            continue
    return None


def format_duration(seconds: float) -> str:
    """``1h02m``, ``9m10s``, ``45s``: short enough for a progress line."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """``update(step)`` after each optimizer step, ``metrics(...)`` when the trainer has logged
    them, ``write(message)`` for a line that must not break the bar. Off on non-main processes."""

    def __init__(self, total: int, initial: int, *, enabled: bool, every_s: float, clock=time.monotonic,
                 stream: TextIO | None | str = "auto") -> None:  # fmt: skip
        self.total, self.step = total, initial
        self.enabled, self.every_s, self.clock = enabled, every_s, clock
        self.stream = terminal_stream() if stream == "auto" else stream
        self.bar = None
        if enabled and self.stream is not None:
            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=self.stream)
        self.loss: float | None = None
        self.images_per_s: float | None = None
        self.origin: tuple[int, float] | None = None  # (step, time) of the first update: the rate's start
        self.last_line = clock()
        self.lines_step = initial  # the step of the last plain line

    def metrics(self, loss: float, images_per_s: float) -> None:
        self.loss, self.images_per_s = loss, images_per_s
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images_per_s:.0f}")

    def update(self, step: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if self.bar is not None:
            self.bar.update(step - self.step)
        self.step = step
        if self.origin is None:
            self.origin = (step, now)
        if self.bar is None and now - self.last_line >= self.every_s:
            self._line(now)

    def write(self, message: str) -> None:
        """A message between the bar's updates (on a terminal), else a log line."""
        if not self.enabled:
            return
        if self.bar is not None:
            tqdm.write(message, file=self.stream)
        else:
            log.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.step != self.lines_step:
            self._line(self.clock())

    def _line(self, now: float) -> None:
        parts = [f"step {self.step}/{self.total} ({100 * self.step / self.total:.0f}%)"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.images_per_s is not None:
            parts.append(f"{self.images_per_s:,.0f} images/s")
        if self.origin is not None and self.step > self.origin[0] and now > self.origin[1]:
            rate = (self.step - self.origin[0]) / (now - self.origin[1])
            parts.append(f"ETA {format_duration((self.total - self.step) / rate)}")
        log.info(", ".join(parts))
        self.last_line, self.lines_step = now, self.step
