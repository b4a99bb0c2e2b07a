"""Data-parallel scaling on one CPU host: 2 processes x 1 thread against 1 process x 2 threads.

    python benchmarks/scaling.py [--steps 80] [--configs quickstart,fashion_mnist_28] [--repeats 2]

Both layouts train the same global batch (the config's data.batch_size; two processes take half
each) through the real trainer, launched with `accelerate launch` and the repository's
configs/accelerate/ files, and the training loop's own `train/images_per_s` (evaluation,
images and checkpoints excluded) is read back from the run's MLflow store, leaving out the
first logging interval (start-up). Prints images/s per layout and the ratio 2x1 / 1x2; each
layout runs ``--repeats`` times in alternation and the best run counts, since this shared
machine has slow spells. Data loading runs in the training processes (num_workers=0) in both
layouts, so the comparison is of the training step and its all-reduce, not of loader workers.

Fashion-MNIST shards are written first from ../shared/data (or Debian's dataset-fashion-mnist).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fashion_mnist import REPO, write_shards  # beside this file


def fashion_mnist_shards(directory: Path) -> list[str]:
    manifest = write_shards("train", directory / "fmnist", "--samples-per-shard", "1000", "--limit", "20000",
                            "--heldout-fraction", "0.05", "--name", "fmnist")  # fmt: skip
    return [f"data.train_urls={manifest}#train", f"data.eval_urls={manifest}#heldout"]


def run(config: str, processes: int, threads: int, steps: int, global_batch: int, data: list[str], run_dir: Path) -> float:
    """Training images/s (all processes together) of one launch."""
    accelerate = "cpu_single" if processes == 1 else "cpu_ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configs" / "accelerate" / f"{accelerate}.yaml"),
        "--num_processes", str(processes), "--num_cpu_threads_per_process", str(threads),
        str(REPO / "pipeline" / "train.py"), "--config", str(REPO / "configs" / f"{config}.yaml"),
        f"train.run_dir={run_dir}", f"train.steps={steps}", f"data.batch_size={global_batch // processes}",
        "data.num_workers=0", "train.log_every=10", "train.eval_at_start=false", "train.eval_every=1000000",
        "train.image_every=1000000", "checkpoint.every=1000000", "train.diagnostics=false",
        "train.final_iw_samples=0", "train.eval_batches=1", *data,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OMP_NUM_THREADS")}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)}\nfailed:\n{result.stderr[-4000:]}")
    from mlflow import MlflowClient

    run_id = json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"]
    history = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}").get_metric_history(run_id, "train/images_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][1:]  # the first interval holds start-up
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--configs", default="quickstart,fashion_mnist_28")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{'config':<18} {'global batch':>12} {'1 proc x 2 threads':>20} {'2 procs x 1 thread':>20} {'ratio':>7}")
        for config in args.configs.split(","):
            data = fashion_mnist_shards(tmp) if config.startswith("fashion_mnist") else []
            from pipeline.config import load_config

            batch = load_config(REPO / "configs" / f"{config}.yaml").data.batch_size
            best = {1: 0.0, 2: 0.0}
            for repeat in range(args.repeats):
                for processes in (1, 2):
                    rate = run(config, processes, 2 // processes, args.steps, batch, data,
                               tmp / f"{config}-{processes}-{repeat}")  # fmt: skip
                    best[processes] = max(best[processes], rate)
            print(f"{config:<18} {batch:>12} {best[1]:>14.1f} img/s {best[2]:>14.1f} img/s {best[2] / best[1]:>6.2f}x",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
