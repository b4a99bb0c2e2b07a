"""Training-step throughput of a config's model, float32 against mixed precision, in one run.

    python benchmarks/train_step.py --config configs/cifar10.yaml [--steps 30] [--batch-size 32]

Measures what the GPU does per optimizer step (forward, negative ELBO, backward, AdamW step)
through Accelerate, as the trainer does, on one fixed batch of real images from the embedded
dataset (resized to the config's resolution), so that the loader is not what is timed.
Prints images/s and peak accelerator memory per precision, and the ratios to float32.
On CPU only float32 is run (bf16 autocast on CPU is not a speed-up worth reporting). Each
precision runs in its own process: Accelerate fixes the precision once per process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from pipeline.config import load_config
from pipeline.data.builtin import ensure_builtin_dataset
from pipeline.data.loader import make_loader
from pipeline.model.vae import VAE


def real_batch(resolution: int, channels: int, batch_size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) photo crops from the embedded dataset, resized to ``resolution``."""
    train_urls, _ = ensure_builtin_dataset()
    loader, _ = make_loader(train_urls, batch_size=batch_size, train=False)
    images = next(iter(loader))["image"][:, :channels]
    if images.shape[-1] != resolution:
        images = F.interpolate(images.float(), size=(resolution, resolution), mode="bilinear", antialias=True)
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images


def images_per_second(cfg, images: torch.Tensor, precision: str, steps: int, warmup: int) -> tuple[float, float]:
    accelerator = Accelerator(mixed_precision=precision)
    torch.manual_seed(0)
    model = VAE(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    images = images.to(accelerator.device)
    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        out = model(images)
        accelerator.backward(out["loss"])
        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    accelerator.free_memory()
    return steps * images.shape[0] / elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cifar10.yaml")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the config's data.batch_size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its conv algorithms first")
    parser.add_argument("--precision", help=argparse.SUPPRESS)  # set for the child process of one precision
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    if args.precision:
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        batch = real_batch(cfg.model.resolution, cfg.model.channels, args.batch_size or cfg.data.batch_size)
        rate, peak = images_per_second(cfg, batch, args.precision, args.steps, args.warmup)
        print(json.dumps({"rate": rate, "peak": peak, "batch": list(batch.shape)}))
        return
    precisions = ["no", "bf16"] if torch.cuda.is_available() else ["no"]
    results = {}
    for precision in precisions:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--precision", precision],
                               capture_output=True, text=True, check=False)  # fmt: skip
        if child.returncode:
            sys.exit(f"{precision}: failed with status {child.returncode}\n{child.stderr[-3000:]}")
        results[precision] = json.loads(child.stdout.strip().splitlines()[-1])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    batch = results["no"]["batch"]
    print(f"{args.config}: {sum(p.numel() for p in VAE(cfg.model).parameters()):,} parameters, batch {batch[0]} "
          f"of {tuple(batch[1:])}, {args.steps} timed steps after {args.warmup}, on {device}")  # fmt: skip
    for precision, result in results.items():
        print(f"  {precision:4s}  {result['rate']:9.1f} images/s  {result['rate'] / results['no']['rate']:5.2f}x float32  "
              f"peak memory {result['peak']:.2f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
