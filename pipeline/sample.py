"""Images from a trained model: samples at chosen temperatures, and reconstructions.

    pipeline-sample runs/quickstart --temperatures 1.0,0.8,0.6 --n 16
    pipeline-sample runs/quickstart --group-temperatures 1,1,1,0.5,0.5,0.2,0.2
    pipeline-sample runs/quickstart --reconstructions

The temperature scales the prior's standard deviation when drawing each latent group: lower
values give smoother, more typical images. Per-group temperatures set it group by group (top,
lowest resolution, first), e.g. to keep the global structure varied and the details calm.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from pipeline.images import save_grid


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a PNG grid of samples (or reconstructions) of a trained run.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", help="a checkpoint directory or its name (default: the newest)")
    parser.add_argument("--weights", choices=["ema", "live"], default="ema")
    parser.add_argument("--temperatures", type=_floats, default=[1.0, 0.8, 0.6], help="one row per temperature")
    parser.add_argument("--group-temperatures", type=_floats, help="one temperature per latent group: one row")
    parser.add_argument("--n", type=int, default=16, help="images per row")
    parser.add_argument("--reconstructions", action="store_true", help="held-out images above their reconstructions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="PNG path (default: <run_dir>/samples/<checkpoint>-<what>.png)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pipeline.checkpoint import CheckpointError
    from pipeline.data.streams import DataError
    from pipeline.runs import heldout_loader, load_trained

    try:
        model, cfg, _, path = load_trained(args.run_dir, args.checkpoint, args.weights)
        loader = heldout_loader(cfg, args.n) if args.reconstructions else None
    except (FileNotFoundError, CheckpointError, DataError) as err:
        print(f"pipeline-sample: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    if loader is not None:
        real = next(iter(loader))["image"][: args.n]
        rows, what = [real, model.reconstruct(real)], "reconstructions"
    elif args.group_temperatures:
        if len(args.group_temperatures) != model.num_groups:
            print(f"pipeline-sample: --group-temperatures needs {model.num_groups} values (one per latent group), "
                  f"got {len(args.group_temperatures)}", file=sys.stderr)  # fmt: skip
            return 2
        rows, what = [model.sample(args.n, args.group_temperatures)], "samples-per-group"
    else:
        rows, what = [model.sample(args.n, t) for t in args.temperatures], "samples"
    out = args.out or args.run_dir / "samples" / f"{path.name}-{args.weights}-{what}.png"
    save_grid(rows, out, bits=cfg.model.data_bits)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
