"""Entry point: ``accelerate launch pipeline/train.py --config configs/quickstart.yaml [k=v ...]``.

Also ``python pipeline/train.py ...`` (one process), the console script ``pipeline-train``, and
any strategy through ``accelerate launch --config_file configs/accelerate/<strategy>.yaml``.
It parses, builds, trains, and closes; everything else lives in the modules it calls.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file, Python puts pipeline/ itself on sys.path, where our module names (config,
    # data, model...) could shadow other packages. Put the repository root there instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import logging

from pipeline.config import ConfigError, load_config
from pipeline.stopping import EXIT_RESUMABLE, StopRequests, TrainingStopped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a hierarchical VAE on WebDataset shards.")
    parser.add_argument("--config", help="YAML config file (configs/*.yaml); defaults apply to what it omits")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 data.batch_size=16")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    # From here on a stop signal is kept for the first step boundary (pipeline/stopping.py).
    stop = StopRequests(cfg.train.stop_signals, cfg.train.time_limit_seconds(), hold=cfg.faults.hold())
    stop.install()

    # Heavy imports after the config check, so a typo is reported in a second.
    from pipeline.data.streams import DataError
    from pipeline.distributed import make_accelerator
    from pipeline.run_lock import RunDirInUse, hold_run_dir
    from pipeline.trainer import Trainer
    from pipeline.updates import TrainingStalled

    try:
        accelerator = make_accelerator(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    stop.main_process = accelerator.is_main_process  # rank 0's clock decides the time limit
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:  # before anything is written there; held until the process ends
        run_lock = hold_run_dir(cfg.train.run_dir, accelerator)
    except RunDirInUse as err:
        # 2, as for a config error (another train.run_dir is the fix); never 75, which a
        # requeueing job script would retry.
        print(f"run dir error: {err}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg, accelerator, stop)
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        run_lock.release()
        return 3
    status = "FAILED"
    try:
        trainer.fit()
        status = "FINISHED"
    except TrainingStopped:
        # Not FAILED (nothing went wrong) nor FINISHED: MLflow's KILLED, "ended from outside".
        # The rerun that resumes this checkpoint reopens the same run id, and MLflow's
        # start_run(run_id=...) sets a reopened run back to RUNNING.
        status = "KILLED"
        return EXIT_RESUMABLE
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        return 3
    except TrainingStalled as err:
        print(f"training stalled: {err}", file=sys.stderr)
        return 4
    finally:
        trainer.close(status)
        accelerator.end_training()
        run_lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
