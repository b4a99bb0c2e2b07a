"""Training-step throughput and peak memory, per config and per speed option, in one run.

    python benchmarks/train_step.py                                   # every CPU config and variant
    python benchmarks/train_step.py --configs quickstart,cifar10_w64 --variants eager,defaults --rounds 5
    python benchmarks/train_step.py --configs cifar10 --batch-size 4 --steps 2 --warmup 1 --rounds 1
    python benchmarks/train_step.py --configs cifar10 --batch-size 4 --profile  # top operators, eager and defaults
    python benchmarks/train_step.py --configs cifar10,imagenet64 --batch-size cifar10=32,imagenet64=16  # on a GPU

Times what the trainer does per optimizer step, on one fixed batch of real images (the embedded
dataset, resized to the config's resolution) so that the loader is not what is timed: forward,
negative ELBO, backward, clip and update (``pipeline.updates.UpdateGuard``), EMA update. The
model and optimizer are built as the trainer builds them (``pipeline.speed``), a variant being
config overrides (``train.channels_last=true``...) on top of the config's own settings.

Each (config, variant, round) runs in a fresh process: Accelerate fixes the precision once per
process, compiled code and allocator caches would leak from one variant into the next, and the
peak RSS is per process. Variants are interleaved round by round (A B C, A B C, ...) so that a
busy machine's drift hits them alike. A process's rate is the batch over its median step time
(each step ends on reading the loss: a sync point); the table gives medians over rounds and
ratios to eager float32 measured in the same run. ``warm-up`` (the first steps, with
compilation) is timed apart from the rate. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's
peak RSS (``ru_maxrss``: interpreter and torch included) and, in brackets, its growth from just
before the model was built (weights, optimizer state, EMA, activations, compiled code).
``loss`` is the first step's, from the same seed, weights, batch and noise in every variant.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: this checkout's pipeline

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.cost import train_flops_per_image, vae_flops_per_image  # noqa: E402

CONFIGS = {
    "quickstart": ("configs/quickstart.yaml", []),
    "fashion_mnist_28": ("configs/fashion_mnist_28.yaml", []),
    "cifar10_w64": ("configs/cifar10.yaml", ["model.width=64"]),
    "cifar10": ("configs/cifar10.yaml", []),
    "imagenet64": ("configs/imagenet64.yaml", []),
}

# The step as it was before the speed options: eager float32, torch's per-tensor AdamW on CPU
# (its foreach one on a GPU), the EMA's per-tensor loop. Every other variant is this plus overrides.
PLAIN = ["train.mixed_precision=no", "train.channels_last=false", "train.compile=none", "model.grad_checkpoint=false"]
CPU_VARIANTS = {
    "eager": [*PLAIN, "optim.implementation=for_loop", "ema=loop"],
    "ema_foreach": [*PLAIN, "optim.implementation=for_loop"],
    "adamw_foreach": [*PLAIN, "optim.implementation=foreach", "ema=loop"],
    "adamw_fused": [*PLAIN, "optim.implementation=fused", "ema=loop"],
    "channels_last": [*PLAIN, "optim.implementation=for_loop", "ema=loop", "train.channels_last=true"],
    "bf16": [*PLAIN, "optim.implementation=for_loop", "ema=loop", "train.mixed_precision=bf16"],
    "compile_cells": [*PLAIN, "optim.implementation=for_loop", "ema=loop", "train.compile=cells"],
    "compile_model": [*PLAIN, "optim.implementation=for_loop", "ema=loop", "train.compile=model"],
    "grad_checkpoint": [*PLAIN, "optim.implementation=for_loop", "ema=loop", "model.grad_checkpoint=true"],
    "defaults": [],  # the config as it is: the schema's defaults are the winning settings
    "defaults_compiled": ["train.compile=model"],
    "defaults_bf16": ["train.mixed_precision=bf16"],
}
GPU_VARIANTS = {
    "eager": [*PLAIN, "optim.implementation=foreach", "ema=loop"],
    "bf16": [*PLAIN, "optim.implementation=foreach", "ema=loop", "train.mixed_precision=bf16"],
    "bf16_channels_last": ["train.mixed_precision=bf16", "train.channels_last=true", "train.compile=none"],
    "bf16_compile": ["train.mixed_precision=bf16", "train.channels_last=true", "train.compile=model"],
    "bf16_cudagraphs": ["train.mixed_precision=bf16", "train.channels_last=true", "train.compile=model",
                        "train.compile_mode=reduce-overhead"],
    "defaults": [],
}


def real_batch(resolution: int, channels: int, batch_size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) photo crops from the embedded dataset, resized to ``resolution``."""
    from pipeline.data.builtin import ensure_builtin_dataset
    from pipeline.data.loader import make_loader

    train_urls, _ = ensure_builtin_dataset()
    loader, _ = make_loader(train_urls, batch_size=batch_size, train=False)
    images = next(iter(loader))["image"][:, :channels]
    if images.shape[-1] != resolution:
        images = F.interpolate(images.float(), size=(resolution, resolution), mode="bilinear", antialias=True)
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images


def legacy_ema_update(ema, model: torch.nn.Module, step: int) -> None:
    """The EMA update before ``torch._foreach_lerp_``: one lerp_ per tensor from Python (the baseline's)."""
    keep = ema.decay_at(step)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                ema.shadow[key].lerp_(value.detach().float(), 1 - keep)
            else:
                ema.shadow[key].copy_(value)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_variant(cfg: Config, images: torch.Tensor, legacy_ema: bool, steps: int, warmup: int, profile: bool) -> dict:
    """One variant in this process: the trainer's step ``warmup + steps`` times."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from pipeline.ema import EMA
    from pipeline.model.vae import VAE
    from pipeline.speed import make_optimizer, prepare_model
    from pipeline.updates import UpdateGuard

    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())
    cuda = accelerator.device.type == "cuda"
    rss_before = peak_rss_mb()
    set_seed(0)
    model = prepare_model(VAE(cfg.model), cfg.train)
    ema = EMA(model, cfg.objective.ema_decay)
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    guard = UpdateGuard(accelerator, scheduler, cfg)
    module = accelerator.unwrap_model(model)
    images = images.to(accelerator.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step(i: int) -> torch.Tensor:
        out = model(images, free_bits=cfg.objective.free_bits)
        accelerator.backward(out["loss"])
        guard.step(model, optimizer)
        (legacy_ema_update if legacy_ema else EMA.update)(ema, module, i)
        return out["loss"].detach()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    first_loss = step(0).item()
    for i in range(1, warmup):
        step(i)
    sync()
    warm = time.perf_counter() - start
    # Each step timed alone (a sync point: the loss is read), the median taken: on a shared
    # machine a step that waited for the cores says nothing about the code.
    times, cpu_times = [], []
    for i in range(warmup, warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        last_loss = step(i).item()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    result = {
        "rate": images.shape[0] / statistics.median(times),
        # This process's CPU time (all its threads): on a shared machine, with --threads 1, far
        # steadier than the wall clock, which counts the time other processes held the core.
        "cpu_rate": images.shape[0] / statistics.median(cpu_times),
        "warmup_s": warm,
        "step_s": times,
        "loss": first_loss,
        "last_loss": last_loss,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb(),
        "growth_mb": float("nan") if cuda else peak_rss_mb() - rss_before,
        "batch": list(images.shape),
        "parameters": sum(p.numel() for p in module.parameters()),
    }
    if profile:
        result["profile"] = profile_steps(step, warmup + steps, cuda, count=steps)
    return result


def profile_steps(step, first: int, cuda: bool, count: int, rows: int = 20) -> str:
    """torch.profiler over ``count`` more steps: the top operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(first, first + count):
            step(i)
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=50)


def achieved_tflops(cfg: Config, rate: float) -> float:
    """TFLOP/s of the step's convolutions at ``rate`` images/s: the run's own count
    (pipeline/cost.py: every Conv2d and Linear of one forward pass, 2 FLOPs per multiply-add,
    the training step 3 forward passes, since the backward computes the gradients of both the
    inputs and the weights), the same figure the trainer logs as ``cost/achieved_flops_per_s``."""
    return train_flops_per_image(vae_flops_per_image(cfg.model)) * rate / 1e12


def child_main(args, variant: list[str]) -> None:
    file, overrides = CONFIGS[args.child_config]
    legacy_ema = "ema=loop" in variant
    cfg = load_config(REPO / file, [*overrides, *args.overrides, *(v for v in variant if v != "ema=loop")])
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.threads:
        torch.set_num_threads(args.threads)
    images = real_batch(cfg.model.resolution, cfg.model.channels, args.child_batch or cfg.data.batch_size)
    result = run_variant(cfg, images, legacy_ema, args.steps, args.warmup, args.profile)
    print(json.dumps(result))


def batch_sizes(text: str) -> dict[str, int]:
    """``"16"`` (every config) or ``"cifar10=4,quickstart=32"``; missing configs: their data.batch_size."""
    if not text:
        return {}
    if "=" not in text:
        return {name: int(text) for name in CONFIGS}
    return {name: int(size) for name, size in (item.split("=") for item in text.split(","))}


def main() -> None:
    cuda = torch.cuda.is_available()
    variants = GPU_VARIANTS if cuda else CPU_VARIANTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="quickstart,fashion_mnist_28,cifar10_w64,cifar10",
                        help=f"comma-separated, of {', '.join(CONFIGS)}")  # fmt: skip
    parser.add_argument("--variants", help=f"comma-separated, of {', '.join(variants)}; default all "
                        "(with --profile: eager,defaults)")  # fmt: skip
    parser.add_argument("--batch-size", default="", help="N for every config, or name=N,...; default data.batch_size")
    parser.add_argument("--steps", type=int, default=20 if cuda else 4, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=5 if cuda else 2, help="untimed first steps (compilation)")
    parser.add_argument("--rounds", type=int, default=1 if cuda else 3, help="processes per variant, interleaved")
    parser.add_argument("--profile", action="store_true", help="also print each variant's top operators")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its conv algorithms first")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak, for MFU (0: not shown)")
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    parser.add_argument("--child-variant", help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every config and variant")
    args = parser.parse_args()
    if args.child_config:
        child_main(args, json.loads(args.child_variant))
        return

    configs = args.configs.split(",")
    chosen = (args.variants or ("eager,defaults" if args.profile else ",".join(variants))).split(",")
    if unknown := [c for c in configs if c not in CONFIGS] + [v for v in chosen if v not in variants]:
        sys.exit(f"unknown config or variant: {unknown}")
    sizes = batch_sizes(args.batch_size)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    report = {"device": device, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "configs": {}}
    for name in configs:
        runs: dict[str, list[dict]] = {v: [] for v in chosen}
        for _ in range(args.rounds):
            for variant in chosen:
                command = [sys.executable, __file__, *args.overrides, "--steps", str(args.steps), "--warmup",
                           str(args.warmup), "--child-config", name, "--child-variant", json.dumps(variants[variant]),
                           "--child-batch", str(sizes.get(name, 0))]  # fmt: skip
                if args.profile:
                    command.append("--profile")
                if args.cudnn_benchmark:
                    command.append("--cudnn-benchmark")
                command += ["--threads", str(args.threads)]
                try:
                    child = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False)
                except subprocess.TimeoutExpired:
                    print(f"{name} {variant}: over {args.timeout:.0f} s, left out", file=sys.stderr)
                    continue
                if child.returncode:
                    print(f"{name} {variant}: failed ({child.returncode})\n{child.stderr[-2000:]}", file=sys.stderr)
                    continue
                runs[variant].append(json.loads(child.stdout.strip().splitlines()[-1]))
                print(f"  {name} {variant}: {runs[variant][-1]['rate']:.2f} images/s, {runs[variant][-1]['cpu_rate']:.2f} per CPU-s", file=sys.stderr, flush=True)
        report["configs"][name] = summarize(name, runs, args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def summarize(name: str, runs: dict[str, list[dict]], args) -> dict:
    """Prints the config's table; returns its medians."""
    done = {v: r for v, r in runs.items() if r}
    if not done:
        return {}
    first = next(iter(done.values()))[0]
    file, overrides = CONFIGS[name]
    print(f"\n{name} ({' '.join([file, *overrides, *args.overrides])}): {first['parameters']:,} parameters, batch "
          f"{first['batch'][0]} of {tuple(first['batch'][1:])}, {args.steps} timed steps after {args.warmup}, "
          f"median of {args.rounds} interleaved rounds")  # fmt: skip
    if args.profile:
        for variant, results in done.items():
            print(f"{variant}, {args.steps} steps after {args.warmup}, top operators by self time:\n{results[0]['profile']}")
    keys = ("rate", "cpu_rate", "warmup_s", "peak_mb", "growth_mb", "loss")
    medians = {v: {k: statistics.median(r[k] for r in rs) for k in keys} for v, rs in done.items()}
    base = medians.get("eager", {}).get("rate")
    base_cpu = medians.get("eager", {}).get("cpu_rate")
    base_loss = medians.get("eager", {}).get("loss")
    print(f"  {'variant':20s} {'images/s':>9s} {'x eager':>8s} {'per CPU-s':>9s} {'x eager':>8s} {'warm-up s':>9s} "
          f"{'peak MB (+growth)':>19s} "
          f"{'loss step 0':>12s} {'- eager':>9s} {'TFLOP/s':>8s} {'MFU':>5s}")  # fmt: skip
    for variant, m in medians.items():
        ratio = f"{m['rate'] / base:8.2f}" if base else f"{'':8s}"
        cpu_ratio = f"{m['cpu_rate'] / base_cpu:8.2f}" if base_cpu else f"{'':8s}"
        diff = f"{m['loss'] - base_loss:+9.1e}" if base_loss is not None else f"{'':9s}"
        # MFU: the achieved TFLOP/s over the device's peak (--peak-tflops, e.g. 989 for an H100/H200 in bf16 dense).
        tflops = achieved_tflops(load_config(REPO / file, [*overrides, *args.overrides]), m["rate"])
        mfu = f"{tflops / args.peak_tflops:5.0%}" if tflops and args.peak_tflops else f"{'n/a':>5s}"
        growth = "" if m["growth_mb"] != m["growth_mb"] else f" (+{m['growth_mb']:.0f})"
        peak = f"{m['peak_mb']:.0f}{growth}"
        print(f"  {variant:20s} {m['rate']:9.2f} {ratio} {m['cpu_rate']:9.2f} {cpu_ratio} {m['warmup_s']:9.1f} {peak:>19s} "
              f"{m['loss']:12.6f} {diff} {f'{tflops:.2f}' if tflops else 'n/a':>8s} {mfu}")  # fmt: skip
    return {"batch": first["batch"], "parameters": first["parameters"], "medians": medians, "runs": done}


if __name__ == "__main__":
    main()
