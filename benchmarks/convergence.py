"""Held-out bits/dim against wall-clock time and images seen, for several variants in one run.

    python benchmarks/convergence.py [--budget 180] [--configs fashion_mnist_28,quickstart]
        [--variants old-init,new-init,...] [--merge] [--out benchmarks/results]

Each variant trains a config's model for ``--budget`` seconds of training (evaluations not
counted) on this machine, one variant at a time, and evaluates the live weights on a fixed
held-out set every ``--eval-every`` seconds. At the end it writes the four VAE problems as
numbers (pipeline.evaluate: active units, collapsed groups, aggregate-posterior KL, variance
ratios), a table on stdout, ``convergence.json`` and ``convergence.png`` (bits/dim against
seconds and against images, one panel per config).

Variants (the preset's KL warm-up unless said otherwise; free bits only where named, so the
variants mean what they meant when measured, whatever the presets say today):
  new-init            the model as built today (zero conv biases, standardised input);
  old-init            PyTorch's default random conv biases and the [-1, 1] input: the
                      initialisation before the VDVAE parity change;
  new-init-no-warmup  new-init with objective.kl_warmup_steps=0;
  new-init-free-bits  new-init with objective.free_bits=4 (per group, bits per image);
  new-init-free-bits-no-warmup  both: free bits 4 and no KL warm-up.

Variants of the learning speed per unit of time (#15), each the preset as it is (its own KL
warm-up and free bits) with one thing changed, against ``preset``:
  preset              the config file as it is: the defaults a user gets;
  lr-x2, lr-x0.5      optim.lr doubled or halved;
  budget-cosine       the cosine schedule decays over the time budget (by seconds trained, to
                      optim.min_lr_ratio) instead of over train.steps, which a short run never
                      reaches: what a user who knows their budget would set;
  batch-x0.5, batch-x0.25, batch-x2  data.batch_size halved, quartered or doubled (the same lr);
  wide                model.width x1.5 (rounded to a multiple of 8);
  deep                every block count of both block strings doubled.
Every variant also keeps EMAs of its weights at three decays (0.99, 0.999, 0.9999, with the
trainer's warm-up of the decay) and evaluates them at each point, so the EMA decay is compared
on the same runs; only the update of the config's own decay is counted in the time.

Variants compose: ``batch-x0.5+lr-x2`` applies both changes.

``--merge`` keeps the variants of an earlier convergence.json that this run does not redo.

The loop is the trainer's step (AdamW, the learning-rate schedule, clipping, update skipping,
KL warm-up, free bits) without checkpoints, EMA or tracking, so that only the variants differ.
Fashion-MNIST comes from ../shared/data (or Debian's dataset-fashion-mnist); the quickstart
config trains on the embedded dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fashion_mnist import write_shards  # noqa: E402  (beside this file)

from pipeline.config import Config, load_config  # noqa: E402  (the repository, not an installed copy)
from pipeline.data.builtin import ensure_builtin_dataset  # noqa: E402
from pipeline.data.loader import EpochIterator, make_loader  # noqa: E402
from pipeline.ema import EMA  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.model import VAE  # noqa: E402
from pipeline.objective import kl_warmup_weight  # noqa: E402
from pipeline.runs import resolve_input_statistics  # noqa: E402
from pipeline.trainer import lr_factor  # noqa: E402

def deeper(blocks: str) -> str:
    """A block string with every repeat count (``RxN``) doubled; the resolution changes stay."""
    return ",".join(f"{token.split('x')[0]}x{2 * int(token.split('x')[1])}" if "x" in token else token
                    for token in blocks.split(","))  # fmt: skip


# Each variant: the overrides it applies to the config (a function of the preset, for the
# relative ones).
VARIANTS: dict[str, Callable[[Config], list[str]]] = {
    "new-init": lambda cfg: ["objective.free_bits=0"],
    "old-init": lambda cfg: ["model.standardize_input=false", "objective.free_bits=0"],
    "new-init-no-warmup": lambda cfg: ["objective.kl_warmup_steps=0", "objective.free_bits=0"],
    "new-init-free-bits": lambda cfg: ["objective.free_bits=4"],
    "new-init-free-bits-no-warmup": lambda cfg: ["objective.free_bits=4", "objective.kl_warmup_steps=0"],
    "preset": lambda cfg: [],
    "lr-x2": lambda cfg: [f"optim.lr={cfg.optim.lr * 2}"],
    "lr-x0.5": lambda cfg: [f"optim.lr={cfg.optim.lr / 2}"],
    "budget-cosine": lambda cfg: [],  # the schedule is the loop's (train_variant)
    "batch-x0.5": lambda cfg: [f"data.batch_size={cfg.data.batch_size // 2}"],
    "batch-x0.25": lambda cfg: [f"data.batch_size={cfg.data.batch_size // 4}"],
    "batch-x2": lambda cfg: [f"data.batch_size={cfg.data.batch_size * 2}"],
    "wide": lambda cfg: [f"model.width={round(cfg.model.width * 1.5 / 8) * 8}"],
    "deep": lambda cfg: [f"model.encoder_blocks={deeper(cfg.model.encoder_blocks)}",
                         f"model.decoder_blocks={deeper(cfg.model.decoder_blocks)}"],  # fmt: skip
}
EMA_DECAYS = (0.99, 0.999, 0.9999)


def overrides_of(variant: str, cfg: Config) -> list[str]:
    """A variant's overrides; ``a+b`` applies both (e.g. ``batch-x0.5+lr-x2``), each relative to
    the preset."""
    return [override for part in variant.split("+") for override in VARIANTS[part](cfg)]


def data_urls(config: str, directory: Path) -> tuple[str, str]:
    if not config.startswith("fashion_mnist"):
        return ensure_builtin_dataset(directory / "builtin")
    manifest = write_shards("train", directory / "fmnist", "--samples-per-shard", "2000", "--limit", "21000",
                            "--heldout-fraction", "0.05", "--name", "fmnist")  # fmt: skip
    return f"{manifest}#train", f"{manifest}#heldout"


def pytorch_default_biases(model: nn.Module) -> None:
    """What every conv bias was before the parity change: uniform +-1/sqrt(fan_in)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is not None):
            bound = 1 / math.sqrt(conv.weight[0].numel())
            conv.bias.copy_((torch.rand(conv.bias.shape, generator=generator) * 2 - 1) * bound)


@torch.no_grad()
def heldout_bpd(model: VAE, batches: list[torch.Tensor]) -> dict[str, float]:
    model.eval()
    totals = torch.zeros(3)
    for images in batches:
        out = model(images)
        totals += torch.tensor([len(images), out["recon_bpd"].item() * len(images), out["kl_bpd"].item() * len(images)])
    model.train()
    recon, kl = (totals[1] / totals[0]).item(), (totals[2] / totals[0]).item()
    return {"bpd": recon + kl, "recon_bpd": recon, "kl_bpd": kl}


def budget_cosine(cfg: Config, step: int, trained: float, budget: float) -> float:
    """The trainer's warm-up, then a cosine over the seconds of the budget instead of the steps."""
    if step < cfg.optim.warmup_steps:
        return lr_factor(cfg, step)
    floor = cfg.optim.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, trained / budget)))


def point(model: VAE, emas: dict[float, EMA], heldout: list[torch.Tensor], **where) -> dict:
    """One point of the curve: the live weights' held-out bits/dim, and each EMA's."""
    result = {**where, **heldout_bpd(model, heldout)}
    for decay, ema in emas.items():
        with ema.applied(model):
            result[f"ema_{decay}_bpd"] = heldout_bpd(model, heldout)["bpd"]
    return result


def train_variant(cfg: Config, train_urls: str, heldout: list[torch.Tensor], budget: float, eval_every: float,
                  variant: str) -> dict:  # fmt: skip
    torch.manual_seed(cfg.train.seed)
    model = VAE(cfg.model)
    if "old-init" in variant.split("+"):
        pytorch_default_biases(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  weight_decay=cfg.optim.weight_decay)  # fmt: skip
    # The schedule's horizon: the steps the budget allows at the measured speed is unknown in
    # advance, so the cosine runs over the config's train.steps as in a real run (budget-cosine:
    # over the seconds of the budget).
    trained = 0.0
    if "budget-cosine" in variant.split("+"):
        factor = lambda step: budget_cosine(cfg, step, trained, budget)  # noqa: E731  (reads trained as it grows)
    else:
        factor = lambda step: lr_factor(cfg, step)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    emas = {decay: EMA(model, decay) for decay in sorted({*EMA_DECAYS, cfg.objective.ema_decay})}
    batches = EpochIterator(*make_loader(train_urls, batch_size=cfg.data.batch_size, train=True, num_workers=1,
                                         channels=cfg.model.channels, shuffle_buffer=cfg.data.shuffle_buffer))  # fmt: skip
    curve = [point(model, emas, heldout, seconds=0.0, images=0, step=0)]
    step, images, skipped = 0, 0, 0
    next_eval = eval_every
    while trained < budget:
        start = time.perf_counter()
        batch = next(batches)["image"]
        out = model(batch, kl_weight=kl_warmup_weight(step, cfg.objective.kl_warmup_steps),
                    free_bits=cfg.objective.free_bits)  # fmt: skip
        out["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        if torch.isfinite(norm) and not 0 < cfg.objective.skip_threshold < norm.item():
            optimizer.step()
            scheduler.step()
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        emas[cfg.objective.ema_decay].update(model, step)  # the trainer's own EMA: part of the step's time
        trained += time.perf_counter() - start
        for decay, ema in emas.items():  # the other decays: compared on this run, not timed
            if decay != cfg.objective.ema_decay:
                ema.update(model, step)
        step, images = step + 1, images + len(batch)
        if trained >= next_eval or trained >= budget:
            curve.append(point(model, emas, heldout, seconds=round(trained, 1), images=images, step=step))
            next_eval += eval_every
    batches.close()
    report = evaluate(model, ({"image": b} for b in heldout), device="cpu")
    four = {
        "active_units": sum(g["active_units"] for g in report["groups"]),
        "units": sum(g["units"] for g in report["groups"]),
        "collapsed_groups": len(report["collapsed_groups"]),
        "groups": len(report["groups"]),
        "aggregate_posterior_kl_group0": report["aggregate_posterior_kl"][0]["kl_nats"],
        "variance_ratio_samples": report["variance_ratio_samples"],
        "variance_ratio_reconstructions": report["variance_ratio_reconstructions"],
        "psnr_db": report["psnr_db"],
    }
    return {"curve": curve, "final": curve[-1], "skipped": skipped, "four_problems": four}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(results)
    fig, axes = plt.subplots(len(configs), 2, figsize=(14, 4 * len(configs)), squeeze=False)
    colours = plt.get_cmap("tab20").colors  # a colour per variant: more of them than the default 10
    for row, config in enumerate(configs):
        for number, (variant, result) in enumerate(results[config].items()):
            curve = result["curve"][1:]  # step 0 is off the scale of the rest
            for col, x in enumerate(("seconds", "images")):
                axes[row][col].plot([p[x] for p in curve], [p["bpd"] for p in curve], marker=".", label=variant,
                                    color=colours[number % len(colours)])  # fmt: skip
                axes[row][col].set_xlabel(f"training {x}")
                axes[row][col].set_ylabel("held-out bits/dim")
                axes[row][col].set_title(config)
                axes[row][col].grid(alpha=0.3)
        axes[row][1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=180.0, help="training seconds per variant")
    parser.add_argument("--eval-every", type=float, default=20.0, help="training seconds between evaluations")
    parser.add_argument("--configs", default="fashion_mnist_28,quickstart")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--heldout-images", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--merge", action="store_true", help="keep an earlier run's other variants")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    if args.merge and (out / "convergence.json").exists():
        results = json.loads((out / "convergence.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            train_urls, eval_urls = data_urls(config, Path(tmp))
            base = load_config(REPO / "configs" / f"{config}.yaml")
            loader, _ = make_loader(eval_urls, batch_size=128, train=False, channels=base.model.channels)
            heldout, count = [], 0
            for batch in loader:
                heldout.append(batch["image"][: args.heldout_images - count])
                count += len(heldout[-1])
                if count >= args.heldout_images:
                    break
            results.setdefault(config, {})
            for variant in args.variants.split(","):
                cfg = load_config(REPO / "configs" / f"{config}.yaml", overrides_of(variant, base))
                cfg = resolve_input_statistics(cfg, train_urls)
                result = train_variant(cfg, train_urls, heldout, args.budget, args.eval_every, variant)
                result["config"] = dataclasses.asdict(cfg.objective)
                results[config][variant] = result
                f, four = result["final"], result["four_problems"]
                print(f"{config:<17} {variant:<20} step0 {result['curve'][0]['bpd']:.3f} (KL {result['curve'][0]['kl_bpd']:.3f})"
                      f" -> {f['bpd']:.3f} bpd (recon {f['recon_bpd']:.3f} + KL {f['kl_bpd']:.3f}) after {f['step']} steps,"
                      f" {f['images']} images, {f['seconds']:.0f} s; collapsed {four['collapsed_groups']}/{four['groups']},"
                      f" active {four['active_units']}/{four['units']}, agg-KL {four['aggregate_posterior_kl_group0']:.1f},"
                      f" var-ratio {four['variance_ratio_samples']:.2f}/{four['variance_ratio_reconstructions']:.2f},"
                      f" PSNR {four['psnr_db']:.2f}; EMA " + ", ".join(f"{d}: {f[f'ema_{d}_bpd']:.3f}" for d in EMA_DECAYS),
                      flush=True)  # fmt: skip
    (out / "convergence.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "convergence.png")
    print(f"wrote {out / 'convergence.json'} and {out / 'convergence.png'}")


if __name__ == "__main__":
    main()
