"""Evaluation of a trained model: bits/dim, an importance-weighted bound, and the four VAE
problems as numbers, written as a JSON report with a figure (and to MLflow).

    pipeline-eval runs/quickstart [--checkpoint step_000800] [--weights ema] [--iw-samples 16]

The importance-weighted bound (Burda et al. 2016) log p(x) >= E[log 1/K sum_k p(x, z_k) / q(z_k|x)]
tightens with K; with K = 1 it is a one-sample ELBO. It is reported in bits/dim, like the ELBO.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from pipeline.diagnostics import (
    RunningMoments,
    active_units,
    fitted_gaussian,
    gaussian_kl_full_vs_diagonal,
    gaussian_log_density,
    psnr,
    variance_ratio,
)
from pipeline.data.streams import DataError
from pipeline.model import VAE
from pipeline.model.likelihood import to_uint8, to_unit_range

log = logging.getLogger(__name__)

MAX_AGGREGATE_DIMS = 1024  # a full covariance above this is neither cheap nor well estimated


@torch.no_grad()
def evaluate(
    model: VAE,
    batches: Iterable[dict[str, Any]],
    *,
    iw_samples: int = 0,
    max_images: int = 0,
    aggregate_groups: int = 2,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Evaluate ``model`` (in eval mode) on uint8 image batches. Returns the report dict."""
    model.eval()
    bits, dims = model.cfg.data_bits, None
    recon_nats, kl_nats, iw_nats, psnrs = [], [], [], []
    group_means = [RunningMoments() for _ in range(model.num_groups)]
    top = list(range(min(aggregate_groups, model.num_groups)))
    top_means: dict[int, list[torch.Tensor]] = {g: [] for g in top}
    top_prior_mean = {g: RunningMoments() for g in top}
    top_prior_var = {g: RunningMoments() for g in top}
    real_pixels, recon_pixels = RunningMoments(), RunningMoments()
    seen = 0
    for batch in batches:
        images = batch["image"].to(device)
        if max_images:
            images = images[: max_images - seen]
        if images.shape[0] == 0:
            continue
        n = images.shape[0]
        seen += n
        x = to_unit_range(images, bits)
        dims = x[0].numel()
        features = model.bottom_up(x)

        # The ELBO with one posterior sample, and more samples for the importance-weighted bound.
        log_weights = []
        for k in range(max(1, iw_samples)):
            state, groups = model.top_down(features, n)
            log_px = -model.likelihood.nll(state, x)
            if k == 0:
                recon_nats.append(-log_px)
                kl_nats.append(torch.stack([g.kl for g in groups], 1))
            if iw_samples:
                log_ratio = sum(
                    gaussian_log_density(g.z, g.prior_mean, g.prior_log_std)
                    - gaussian_log_density(g.z, g.posterior_mean, g.posterior_log_std)
                    for g in groups
                )
                log_weights.append(log_px + log_ratio)
        if iw_samples:
            iw_nats.append(-(torch.logsumexp(torch.stack(log_weights), 0) - math.log(iw_samples)))

        # The deterministic path (every group passes its posterior mean on): collapse, the
        # aggregate posterior, reconstructions.
        state, groups = model.top_down(features, n, use_mean=True)
        for g, group in enumerate(groups):
            group_means[g].add(group.posterior_mean)
            if g in top_means and group.posterior_mean[0].numel() <= MAX_AGGREGATE_DIMS:
                top_means[g].append(group.posterior_mean.double().flatten(1).cpu())
                top_prior_mean[g].add(group.prior_mean)
                top_prior_var[g].add(torch.exp(2 * group.prior_log_std))
        reconstruction = to_uint8(model.likelihood.mode(state), bits)
        real = to_uint8(x, bits)
        psnrs.append(psnr(real, reconstruction))
        real_pixels.add(real.float())
        recon_pixels.add(reconstruction.float())
        if max_images and seen >= max_images:
            break
    if seen == 0:
        raise DataError("no images to evaluate: every held-out batch was empty or unreadable (see the warnings above)")

    sample_pixels = RunningMoments()
    batch_size = max(1, min(64, seen))
    for start in range(0, seen, batch_size):
        sample_pixels.add(to_uint8(model.sample(min(batch_size, seen - start), 1.0), bits).float())

    to_bpd = 1.0 / (dims * math.log(2))
    recon = torch.cat(recon_nats)
    kl = torch.cat(kl_nats)  # (N, G)
    report: dict[str, Any] = {
        "images": seen,
        "nelbo_bpd": float((recon.mean() + kl.sum(1).mean()) * to_bpd),
        "recon_bpd": float(recon.mean() * to_bpd),
        "kl_bpd": float(kl.sum(1).mean() * to_bpd),
        "iw_samples": iw_samples,
        "iw_bound_bpd": float(torch.cat(iw_nats).mean() * to_bpd) if iw_samples else None,
        "psnr_db": float(torch.cat(psnrs).mean()),
        "variance_ratio_samples": variance_ratio(sample_pixels, real_pixels),
        "variance_ratio_reconstructions": variance_ratio(recon_pixels, real_pixels),
        "groups": [],
        "aggregate_posterior_kl": [],
    }
    for g, block in enumerate(model.top_down.blocks):
        units = group_means[g].total.numel()
        active = active_units(group_means[g])
        report["groups"].append({
            "group": g, "resolution": block.resolution, "units": units,
            "kl_bpd": float(kl[:, g].mean() * to_bpd), "active_units": active, "active_fraction": active / units,
        })  # fmt: skip
    report["collapsed_groups"] = [r["group"] for r in report["groups"] if r["active_units"] == 0]
    for g in top:
        if not top_means[g]:
            continue
        mean0, cov0 = fitted_gaussian(torch.cat(top_means[g]))
        # The prior's aggregate, moment-matched: its mean, and E[var] + Var[mean] per unit.
        prior_mean = top_prior_mean[g].mean().cpu()
        prior_var = (top_prior_var[g].mean() + top_prior_mean[g].variance()).cpu()
        kl_value = gaussian_kl_full_vs_diagonal(mean0, cov0, prior_mean, prior_var)
        report["aggregate_posterior_kl"].append({"group": g, "dims": mean0.numel(), "kl_nats": kl_value})
    return report


def flat_metrics(report: dict[str, Any], prefix: str) -> dict[str, float]:
    """The report's numbers as MLflow metrics."""
    out = {f"{prefix}/{k}": float(v) for k, v in report.items() if isinstance(v, (int, float)) and v is not None}
    for group in report["groups"]:
        out[f"{prefix}/active_units/group_{group['group']:02d}"] = group["active_units"]
    out[f"{prefix}/collapsed_groups"] = len(report["collapsed_groups"])
    for item in report["aggregate_posterior_kl"]:
        out[f"{prefix}/aggregate_posterior_kl/group_{item['group']:02d}"] = item["kl_nats"]
    return out


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """KL and active units per group, and the bits/dim split, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = report["groups"]
    index = [g["group"] for g in groups]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].bar(index, [g["kl_bpd"] for g in groups], color="tab:blue")
    axes[0].set(title="KL per latent group", xlabel="group (top = 0)", ylabel="bits/dim")
    axes[1].bar(index, [g["active_fraction"] for g in groups], color="tab:green")
    for g in report["collapsed_groups"]:
        axes[1].annotate("collapsed", (g, 0.02), rotation=90, ha="center", fontsize=8, color="tab:red")
    axes[1].set(title="active units per group", xlabel="group", ylabel="fraction active", ylim=(0, 1.05))
    axes[2].bar(["reconstruction", "KL"], [report["recon_bpd"], report["kl_bpd"]], color=["tab:orange", "tab:blue"])
    title = f"negative ELBO {report['nelbo_bpd']:.3f} bits/dim"
    if report.get("iw_bound_bpd") is not None:
        title += f"\nIW bound (K={report['iw_samples']}) {report['iw_bound_bpd']:.3f}"
    axes[2].set(title=title, ylabel="bits/dim")
    return save_figure(fig, path)


def save_figure(fig, path: Path | str) -> Path:
    """Lay out, write (parent directories made) and close a matplotlib figure: the report's
    figure and the trainer's quality-against-cost figure are saved alike."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate a training run's checkpoint on its held-out shards.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", help="a checkpoint directory or its name (default: the newest)")
    parser.add_argument("--weights", choices=["ema", "live"], default="ema")
    parser.add_argument("--iw-samples", type=int, default=16, help="K of the importance-weighted bound (0: skip)")
    parser.add_argument("--max-images", type=int, default=0, help="0: the whole held-out split")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the run's data.batch_size")
    parser.add_argument("--eval-urls", help="shards to evaluate on (default: the run's held-out shards), e.g. a test split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report to the run's MLflow run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pipeline.checkpoint import CheckpointError
    from pipeline.data.streams import DataError
    from pipeline.runs import heldout_loader, load_trained, resolve_data_urls

    try:
        model, cfg, state, path = load_trained(args.run_dir, args.checkpoint, args.weights)
        eval_urls = args.eval_urls or resolve_data_urls(cfg)[1]
        loader = heldout_loader(cfg, args.batch_size or cfg.data.batch_size, eval_urls)
    except (FileNotFoundError, CheckpointError, DataError) as err:
        print(f"pipeline-eval: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    report = evaluate(model, loader, iw_samples=args.iw_samples, max_images=args.max_images)
    report = {"checkpoint": str(path), "step": state["step"], "weights": args.weights, "data": eval_urls, **report}

    out = args.run_dir / "eval" / f"{path.name}-{args.weights}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    figure = plot_report(report, out / "figure.png")
    print(json.dumps({k: v for k, v in report.items() if k not in ("groups",)}, indent=2))
    print(f"report: {out / 'report.json'}, figure: {figure}")
    if cfg.tracking.enabled and not args.no_mlflow:
        from pipeline.tracking import Tracker

        tracker = Tracker(active=True, tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
                          run_dir=args.run_dir, resume_run_id=state.get("mlflow_run_id"))  # fmt: skip
        tracker.log_metrics(flat_metrics(report, f"test_{args.weights}"), state["step"])
        tracker.log_artifact(out, f"eval/{out.name}")
        tracker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
