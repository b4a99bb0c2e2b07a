"""Does a tracking server outage slow training down? One training run logs every step to a real
``mlflow server`` (SQLite, 127.0.0.1); after ``--stop-at`` steps the server is stopped and the run
goes on without it. The mean step time with the server up and during the outage, from the
timestamps of the run's own tracking spool, and their ratio (issue #13's goal: <= 1.05).

    python benchmarks/tracking_outage.py [--steps 300] [--stop-at 120] [--model tiny|quickstart] [k=v ...]

The first 10 steps (warm-up) and the steps logged while the server was shutting down are left
out. Extra arguments are training overrides. On a busy machine the numbers are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.servers import local_mlflow_server

TINY_MODEL = [
    "model.width=16", "model.latent_channels=4",
    "model.encoder_blocks=32x1,32d2,16x1,16d2,8x1,8d2,4x1", "model.decoder_blocks=4x1,8m4,8x1,16m8,16x1,32m16,32x1",
]  # fmt: skip
WARM_UP = 10


def spooled_steps(run_dir: Path) -> list[tuple[int, float]]:
    spool = run_dir / "tracking" / "spool.jsonl"
    if not spool.exists():
        return []
    records = [json.loads(line) for line in spool.read_text().splitlines() if line.endswith("}")]
    return [(r["step"], r["ts"] / 1000) for r in records if r["op"] == "metrics" and "train/loss" in r["metrics"]]


def step_times(points: list[tuple[int, float]], start: float, end: float) -> list[float]:
    """Seconds between consecutive steps both logged within [start, end]."""
    inside = [(s, t) for s, t in points if start <= t <= end and s > WARM_UP]
    return [(t2 - t1) / (s2 - s1) for (s1, t1), (s2, t2) in zip(inside, inside[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--stop-at", type=int, default=120, help="the step after which the server is stopped")
    parser.add_argument("--model", choices=["tiny", "quickstart"], default="tiny")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = local_mlflow_server(tmp / "store").start()
        run_dir = tmp / "run"
        command = [
            sys.executable, str(REPO / "pipeline" / "train.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
            f"train.run_dir={run_dir}", f"data.cache_dir={tmp / 'data'}", f"train.steps={args.steps}",
            "train.log_every=1", "train.eval_at_start=false", "train.eval_every=100000", "train.image_every=100000",
            "checkpoint.every=100000", "train.eval_batches=1", "train.final_iw_samples=0", "train.diagnostics=false",
            "tracking.flush_timeout=1", "tracking.system_metrics_interval=1",
            *(TINY_MODEL if args.model == "tiny" else []), *args.overrides,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"MLFLOW_TRACKING_URI": server.url}
        with open(tmp / "train.log", "w") as out:
            training = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while not any(s >= args.stop_at for s, _ in spooled_steps(run_dir)):
                if training.poll() is not None:
                    output = (tmp / "train.log").read_text()[-3000:]
                    raise SystemExit(f"training ended before step {args.stop_at}:\n{output}")
                time.sleep(0.05)
            stopping = time.time()
            server.stop()
            stopped = time.time()
            if training.wait() != 0:
                raise SystemExit(f"training failed:\n{(tmp / 'train.log').read_text()[-3000:]}")
        finally:
            server.stop()
            if training.poll() is None:
                training.kill()
        points = spooled_steps(run_dir)
        ended = max(t for _, t in points)
        up, down = step_times(points, 0, stopping), step_times(points, stopped, ended)
        if len(up) < 5 or len(down) < 5:
            raise SystemExit(f"too few steps to compare ({len(up)} with the server up, {len(down)} during the outage)")
        log_text = (tmp / "train.log").read_text()
        left = next((line for line in log_text.splitlines() if "tracking records not uploaded" in line), "")
    up_mean, down_mean = statistics.mean(up), statistics.mean(down)
    print(f"model {args.model}, {args.steps} steps, the server stopped after step {args.stop_at} "
          f"(stopping took {stopped - stopping:.1f} s)")
    for name, times in (("server up:  ", up), ("server down:", down)):
        print(f"{name} {len(times)} steps, mean {statistics.mean(times) * 1000:.1f} ms/step "
              f"(median {statistics.median(times) * 1000:.1f})")
    print(f"ratio down/up: {down_mean / up_mean:.3f} (goal <= 1.05)")
    if left:
        print("at the end:", left.split("WARNING pipeline.tracking: ")[-1][:200])


if __name__ == "__main__":
    main()
