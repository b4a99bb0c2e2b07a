"""The kill -9 harness (issue #14): train a tiny model, kill the trainer with SIGKILL at random
moments, restart it after each kill until it completes, then compare its final weights, EMA,
optimizer state, scheduler, step, data position and RNG bit for bit with those of an
uninterrupted run of the same config (started at the same time, beside it).

    python -m tests.kill_harness --kills 20 --seed 7     # the long version (its result: README)
    pytest tests/test_kill9.py                           # the short version: 3 kills, in the suite

Each kill has a target, drawn from the seed before anything runs (the plan is printed first):

- ``write``: after a random 2-4 steps of this start, the moment the trainer's checkpoint temporary
  directory appears (polled about every half millisecond), plus a random 0-20 ms: inside the
  write (10-30 ms here), or just after;
- ``step``: after a random 2-4 steps of this start, plus a random part of a step;
- ``time``: a random time after the start, up to the previous start's set-up time plus a second
  (at the latest ``MAX_STEPS_PER_START`` steps in): in the set-up (imports, loader, resume) about
  as often as in the steps.

Where a kill really landed is read from what it left, not from its target: the write's temporary
directory (inside a checkpoint write, with the files written so far), an old checkpoint being
pruned, no step logged by this start (set-up), the last step logged (final evaluation, export).
A write target that missed counts where it landed; when none of the planned kills landed inside
a write, up to ``EXTRA_WRITE_KILLS`` more are made. The same seed gives the same plan, not the
same instants (the machine's timing decides those): a failure names the kill, its target, its
delay and where it landed, with every start's log kept in the work directory.

Checked after each kill, besides the final comparison: every ``step_N`` directory a resume could
pick is whole (passes ``verify_checkpoint``); the next start resumes from the newest checkpoint
whose write had finished (from scratch when none had), with no checkpoint reported damaged; the
killed trainer's loader workers exit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    verify_checkpoint,
)
from tests.conftest import REPO, launch_command
from tests.conftest import test_environment as environment  # (an alias: pytest would collect test_*)

# One checkpoint per step, a loader worker (its position is part of what must resume exactly),
# no MLflow and no evaluation but a one-batch final one: the run is steps and checkpoint writes.
HARNESS_OVERRIDES = (
    "checkpoint.every=1", "checkpoint.keep_last=3", "data.num_workers=1", "tracking.enabled=false",
    "train.eval_at_start=false", "train.diagnostics=false", "train.final_iw_samples=0", "train.eval_batches=1",
    "train.progress_every=0.001",
)  # fmt: skip
TARGETS = ("write", "step", "time")
EXTRA_WRITE_KILLS = 3
WRITE_DELAY_S = 0.020  # the most a write target waits after the temporary directory appears
DEFAULT_SETUP_S = 6.0  # a start's set-up before its first step, until one has been measured
MAX_STEPS_PER_START = 5  # what a time target lets a start train at most; a step or write target, 4
STEP_S = 0.15  # the most a step target waits after its step's line (a step takes about 0.1 s here)
START_TIMEOUT_S = 300  # any one start, and the reference run: a hang is a failure, not a wait

STEP_LINE = re.compile(r"pipeline\.progress: step (\d+)/\d+")
RESUMED_LINE = re.compile(r"resumed from \S*?(step_\d+) \(step (\d+),")
DAMAGED_LINE = "skipping damaged checkpoint"
WRITE_TEMPORARY = re.compile(r"^\.tmp-(step_\d+)-(\d+)$")  # save_checkpoint's .tmp-step_N-<pid>
PRUNE_TEMPORARY = re.compile(r"^\.tmp-(step_\d+)-trash$")  # an old checkpoint renamed to be deleted
# Run-specific by design: what a start measured of the wall clock and energy (the run's cost
# record, where the trainer keeps one: its image count is compared), the MLflow run (none here),
# the run directory.
NOT_COMPARED = {"device_seconds", "cost.train_seconds", "cost.gpu_seconds", "cost.energy_j", "mlflow_run_id",
                "config.train.run_dir"}  # fmt: skip


@dataclass
class Kill:
    number: int
    target: str
    draw: float  # the plan's random number in [0, 1) that sets the delay
    start: int  # the start of the run it ended (1 = the first)
    after_s: float = 0.0  # seconds from that start's launch to the kill
    landed: str = ""  # where it landed, read from what it left
    detail: str = ""
    before_first_checkpoint: bool = False  # no checkpoint of the run was whole when it struck

    def line(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return (f"kill {self.number}: target {self.target} (draw {self.draw:.3f}), start {self.start}, "
                f"{self.after_s:.2f} s after its launch -> {self.landed}{detail}")  # fmt: skip


@dataclass
class HarnessResult:
    seed: int
    steps: int
    kills: list[Kill]
    starts: int
    resumes: int  # starts that resumed from a checkpoint
    compared: list[str]  # what the final comparison covered
    differences: list[str]  # each differing tensor or state entry, by name
    problems: list[str]  # anything else that went wrong (a bad resume, a damaged checkpoint, ...)
    wall_s: float
    work_dir: str
    landed: dict[str, int] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return bool(self.compared) and not self.differences

    @property
    def ok(self) -> bool:
        return self.identical and not self.problems

    def summary(self) -> str:
        where = ", ".join(f"{n} {place}" for place, n in self.landed.items())
        first = sum(k.before_first_checkpoint for k in self.kills)
        lines = [
            f"kill -9 harness, seed {self.seed}: {len(self.kills)} kills over {self.starts} starts "
            f"({self.resumes} resumed from a checkpoint), {self.steps} steps, {self.wall_s:.0f} s",
            f"  landed: {where}; {first} before the run's first checkpoint",
            *(f"  {k.line()}" for k in self.kills),
            "  compared with the uninterrupted run: " + "; ".join(self.compared),
            "  result: " + ("bit-identical" if self.identical else f"{len(self.differences)} differences"),
            *(f"  DIFFERENT {d}" for d in self.differences),
            *(f"  PROBLEM {p}" for p in self.problems),
            f"  logs: {self.work_dir}",
        ]
        return "\n".join(lines)


def plan(kills: int, seed: int) -> list[tuple[str, float]]:
    """(target, draw) per kill: the three targets in turn, shuffled, each with a random draw."""
    rng = random.Random(seed)
    targets = [TARGETS[i % len(TARGETS)] for i in range(kills)]
    rng.shuffle(targets)
    return [(target, rng.random()) for target in targets]


# --- one start of the training process ------------------------------------------------------


class Start:
    """One launch of the trainer, its output going to a log file that the harness reads."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.launched = time.monotonic()
        self.first_step_s: float | None = None  # from launch to this start's first step line

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def steps_logged(self) -> list[int]:
        return [int(m[1]) for m in STEP_LINE.finditer(self.text())]

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_for_steps(self, count: int, deadline: float) -> bool:
        """Until this start has logged ``count`` steps; False if it ended (or timed out) first."""
        while self.running() and time.monotonic() < deadline:
            if len(self.steps_logged()) >= count:
                if self.first_step_s is None:
                    self.first_step_s = time.monotonic() - self.launched
                return True
            time.sleep(0.005)
        return False

    def wait_for_write(self, checkpoint_dir: Path, deadline: float) -> bool:
        """Until this process's checkpoint temporary directory exists (polled without sleeping
        between looks: a write lasts tens of milliseconds); False if it ended first."""
        mine = f"-{self.process.pid}"
        while self.running() and time.monotonic() < deadline:
            try:
                if any(n.startswith(".tmp-step_") and n.endswith(mine) for n in os.listdir(checkpoint_dir)):
                    return True
            except FileNotFoundError:
                pass
            time.sleep(0.0005)
        return False

    def children(self) -> list[psutil.Process]:
        """The processes the trainer has started (its loader workers): after a kill they must go
        away by themselves."""
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


# --- where a kill landed, what it left --------------------------------------------------------


def where_it_landed(checkpoint_dir: Path, start: Start, steps: int) -> tuple[str, str]:
    leftovers = sorted(p for p in checkpoint_dir.glob(".tmp-*")) if checkpoint_dir.is_dir() else []
    for path in leftovers:
        match = WRITE_TEMPORARY.match(path.name)
        if match and int(match[2]) == start.process.pid:
            written = sorted(f.name for f in path.iterdir())
            return "inside a checkpoint write", f"{match[1]}: {', '.join(written) or 'no file'} written"
    for path in leftovers:
        if match := PRUNE_TEMPORARY.match(path.name):
            return "while pruning an old checkpoint", match[1]
    logged = start.steps_logged()
    if not logged:
        return "during set-up", "no step logged by this start"
    if logged[-1] >= steps:
        return "after the last step", "final save, evaluation or export"
    return "during the steps", f"last step logged {logged[-1]}"


def whole_checkpoints(checkpoint_dir: Path) -> tuple[list[str], list[str]]:
    """(the checkpoints a resume may pick, newest last; problems): every ``step_N`` directory must
    be whole, since the trainer skips a damaged one with a warning, and a kill must never cause one."""
    whole, problems = [], []
    if checkpoint_dir.is_dir():
        listed = {p.name for p in list_checkpoints(checkpoint_dir)}
        for path in sorted(checkpoint_dir.glob("step_*")):
            if path.name not in listed:
                problems.append(f"{path.name} has no {STATE_FILE}: a half checkpoint under a final name")
                continue
            try:
                verify_checkpoint(path)
                whole.append(path.name)
            except CheckpointError as err:
                problems.append(f"{path.name} is damaged: {err}")
    return whole, problems


def check_resume(start: Start, number: int, expected: str | None) -> list[str]:
    """The start must resume from ``expected`` (the newest whole checkpoint when the previous start
    was killed), or from scratch when there was none, and see no damaged checkpoint."""
    text = start.text()
    problems = []
    if DAMAGED_LINE in text:
        problems.append(f"start {number} found a damaged checkpoint: "
                        + next(line for line in text.splitlines() if DAMAGED_LINE in line))  # fmt: skip
    match = RESUMED_LINE.search(text)
    resumed = match[1] if match else None
    # A start killed before it had loaded anything has nothing to judge.
    if resumed != expected and (match or start.steps_logged() or start.process.returncode == 0):
        problems.append(f"start {number} resumed from {resumed or 'scratch'}, expected {expected or 'scratch'}")
    return problems


# --- the final comparison -----------------------------------------------------------------------


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))  # NaN == NaN here


def _differing_paths(a, b, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in sorted(a.keys() | b.keys(), key=str)
                for p in _differing_paths(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}")]  # fmt: skip
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _differing_paths(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def compare_checkpoints(reference: Path, resumed: Path) -> tuple[list[str], list[str]]:
    """(what was compared, what differs): every tensor of the weights, the EMA and the optimizer
    state by name, bit for bit, their metadata, and state.json but for ``NOT_COMPARED``."""
    compared, differences = [], []
    for name in (MODEL_FILE, EMA_FILE, OPTIMIZER_FILE):
        a, b = load_file(reference / name), load_file(resumed / name)
        for key in sorted(a.keys() | b.keys()):
            if key not in a or key not in b:
                differences.append(f"{name}: {key} only in the {'resumed' if key in b else 'uninterrupted'} run")
            elif not _same_bits(a[key], b[key]):
                detail = ""
                if a[key].shape == b[key].shape and a[key].is_floating_point() and b[key].is_floating_point():
                    detail = f", largest difference {(a[key].double() - b[key].double()).abs().max().item():.3g}"
                differences.append(f"{name}: {key}{detail}")
        with safe_open(reference / name, "pt") as fa, safe_open(resumed / name, "pt") as fb:
            differences += [f"{name}: metadata{p}" for p in _differing_paths(fa.metadata(), fb.metadata(), "")]
        compared.append(f"{name} ({len(a)} tensors + metadata)")
    a, b = (json.loads((d / STATE_FILE).read_text()) for d in (reference, resumed))
    keys = sorted((a.keys() | b.keys()) - NOT_COMPARED)
    paths = [p[1:] for k in keys for p in _differing_paths(a.get(k), b.get(k), f".{k}")]
    differences += [f"{STATE_FILE}: {p}" for p in paths if p not in NOT_COMPARED]
    compared.append(f"{STATE_FILE} ({', '.join(keys)}; not {', '.join(sorted(NOT_COMPARED))})")
    return compared, differences


# --- the harness ---------------------------------------------------------------------------------


def run_harness(
    work_dir: Path, kills: int, seed: int, steps: int | None = None, data_cache: Path | None = None, echo=print
) -> HarnessResult:
    """Run the uninterrupted reference and the killed run side by side, then compare them."""
    started = time.monotonic()
    steps = steps or MAX_STEPS_PER_START * (kills + EXTRA_WRITE_KILLS + 1)  # more than the kills can take
    work_dir.mkdir(parents=True, exist_ok=True)
    data_cache = data_cache or work_dir / "data"
    from pipeline.data.builtin import ensure_builtin_dataset

    ensure_builtin_dataset(data_cache)  # once, before two processes would both write it
    env = environment({"OMP_NUM_THREADS": "1"})  # one thread each: the two runs share the cores

    def command(run_dir: Path) -> list[str]:
        return launch_command(run_dir, *HARNESS_OVERRIDES, f"train.steps={steps}", data_cache=data_cache,
                              plain_python=True)  # fmt: skip

    reference_dir, killed_dir = work_dir / "uninterrupted", work_dir / "killed"
    checkpoint_dir = killed_dir / "checkpoints"
    reference = Start(command(reference_dir), work_dir / "uninterrupted.log", env)
    the_plan = plan(kills, seed)
    echo(f"kill -9 harness, seed {seed}, {steps} steps; plan: "
         + ", ".join(f"{t} ({d:.3f})" for t, d in the_plan) + f"; work directory {work_dir}")  # fmt: skip

    done: list[Kill] = []
    problems: list[str] = []
    orphans: list[tuple[int, list[psutil.Process]]] = []
    expected_resume: dict[int, str | None] = {1: None}
    setup_s = DEFAULT_SETUP_S
    starts: list[Start] = []
    extra = 0
    while True:
        landed_in_write = any(k.landed.startswith("inside a checkpoint write") for k in done)
        if len(done) < len(the_plan):
            target, draw = the_plan[len(done)]
        elif not landed_in_write and extra < EXTRA_WRITE_KILLS:
            target, draw, extra = "write", random.Random(seed * 1000 + extra).random(), extra + 1
        else:
            target = None
        number = len(starts) + 1
        start = Start(command(killed_dir), work_dir / f"killed-start-{number:02d}.log", env)
        starts.append(start)
        if target is None:  # the last start: to the end
            try:
                start.process.wait(timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                start.kill()
                problems.append(f"start {number} (the last) did not finish in {START_TIMEOUT_S} s")
            break
        deadline = start.launched + START_TIMEOUT_S
        # Two to four steps into the start, so that most starts resume from a checkpoint of the
        # one before; the draw's first digit in base 3 sets the step, the rest the delay.
        if target == "write":
            reached = start.wait_for_steps(2 + int(draw * 3), deadline)
            children = start.children()  # now: listing them inside the write would delay the kill
            reached = reached and start.wait_for_write(checkpoint_dir, deadline)
            delay = (draw * 3 % 1) * WRITE_DELAY_S
        elif target == "step":
            reached = start.wait_for_steps(2 + int(draw * 3), deadline)
            delay = (draw * 3 % 1) * STEP_S
        else:
            reached, delay = True, draw * (setup_s + 1.0)
        if not reached and start.running():
            problems.append(f"start {number} did not reach kill {len(done) + 1}'s moment ({target}) in "
                            f"{START_TIMEOUT_S} s; see {start.log_path}")  # fmt: skip
        if target == "time":
            # A start whose set-up is quicker than the last one's could otherwise train to the end
            # before its kill: a time target strikes at the latest MAX_STEPS_PER_START steps in.
            while time.monotonic() - start.launched < delay and len(start.steps_logged()) < MAX_STEPS_PER_START:
                time.sleep(0.005)
        elif reached:
            time.sleep(delay)
        if target != "write":
            children = start.children()
        if not start.running():
            problems.append(f"start {number} ended (exit {start.process.returncode}) before kill {len(done) + 1} "
                            f"(target {target}); see {start.log_path}")  # fmt: skip
            break
        start.kill()
        kill = Kill(len(done) + 1, target, draw, number, after_s=time.monotonic() - start.launched)
        orphans.append((kill.number, children))
        kill.landed, kill.detail = where_it_landed(checkpoint_dir, start, steps)
        if start.first_step_s is not None:
            setup_s = start.first_step_s
        whole, damaged = whole_checkpoints(checkpoint_dir)
        kill.before_first_checkpoint = not whole
        problems += [f"after kill {kill.number}: {p}" for p in damaged]
        expected_resume[number + 1] = whole[-1] if whole else None
        done.append(kill)
        echo(kill.line())

    for number, start in enumerate(starts, 1):
        problems += check_resume(start, number, expected_resume.get(number))
    last = starts[-1]
    if last.process.returncode != 0:
        problems.append(f"the last start exited with {last.process.returncode}:\n{last.text()[-3000:]}")
    try:
        reference.process.wait(timeout=max(1.0, START_TIMEOUT_S - (time.monotonic() - reference.launched)))
    except subprocess.TimeoutExpired:
        reference.kill()
    if reference.process.returncode != 0:
        problems.append(f"the uninterrupted run exited with {reference.process.returncode}:\n"
                        + reference.text()[-3000:])  # fmt: skip
    for number, children in orphans:
        _, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:  # ours: started by the trainer we killed
            problems.append(f"kill {number}: the trainer's child {child.pid} ({child.name()}) outlived it by 10 s")
            child.kill()

    # The kills must leave nothing behind once the run is done: no temporary directory, and the
    # same newest checkpoints kept as the uninterrupted run keeps.
    problems += [f"left behind after the last start: {p}" for p in sorted(checkpoint_dir.glob(".tmp-*"))]
    kept = [[p.name for p in list_checkpoints(d / "checkpoints")] for d in (reference_dir, killed_dir)]
    if kept[0] != kept[1]:
        problems.append(f"checkpoints kept: {kept[1]}, the uninterrupted run kept {kept[0]}")

    compared, differences = [], []
    final = checkpoint_name(steps)
    a, b = reference_dir / "checkpoints" / final, checkpoint_dir / final
    if (a / STATE_FILE).exists() and (b / STATE_FILE).exists():
        compared, differences = compare_checkpoints(a, b)
    else:
        problems.append(f"no final checkpoint {final} to compare in " + " and ".join(
            str(d.parent.parent) for d in (a, b) if not (d / STATE_FILE).exists()))  # fmt: skip
    resumes = sum(bool(RESUMED_LINE.search(s.text())) for s in starts)
    return HarnessResult(
        seed=seed, steps=steps, kills=done, starts=len(starts), resumes=resumes, compared=compared,
        differences=differences, problems=problems, wall_s=time.monotonic() - started, work_dir=str(work_dir),
        landed=dict(Counter(k.landed for k in done).most_common()),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="planned kills (default 20, the long version)")
    parser.add_argument("--seed", type=int, help="sets the plan (default: drawn, and printed)")
    parser.add_argument("--steps", type=int, help="training steps (default 5 x (kills + 4))")
    parser.add_argument("--work-dir", type=Path, help="where the runs and logs go (default: a new temporary directory)")
    parser.add_argument("--data-cache", type=Path, help="the embedded dataset's shards (default: under --work-dir)")
    parser.add_argument("--json", type=Path, help="also write the result here as JSON")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be at least 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="kill-harness-"))
    result = run_harness(work_dir, args.kills, seed, args.steps, args.data_cache)
    print(result.summary())
    print(f"replay the plan: python -m tests.kill_harness --kills {args.kills} --seed {seed}"
          + (f" --steps {args.steps}" if args.steps else ""))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({**asdict(result), "identical": result.identical, "ok": result.ok,
                                         "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")  # fmt: skip
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
