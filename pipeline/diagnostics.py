"""The four classic VAE problems, as numbers (see DESIGN.md):

1. reconstruction vs KL: the two parts of the bits/dim, per latent group (objective.py);
2. variable collapse: *active units* (Burda et al. 2016): a latent unit is active when its
   posterior mean varies across the data, Var_x(E_q[z|x]) > 0.01; a group with none is collapsed;
3. aggregate posterior vs prior: a Gaussian fitted to the posterior means over held-out data,
   against the prior, as KL(fit || prior) for the top groups;
4. blurriness / variance loss (Asperti 2020): per-pixel variance of generated images (and of
   reconstructions) over that of real images; 1 is right, well below 1 is blur.
"""

from __future__ import annotations

import math

import torch

ACTIVE_THRESHOLD = 0.01


class RunningMoments:
    """Per-unit sum and sum of squares over batches (float64), for means and variances."""

    def __init__(self) -> None:
        self.n, self.total, self.total_sq = 0, None, None

    def add(self, batch: torch.Tensor) -> None:
        """batch: (N, ...) -> accumulates over N."""
        flat = batch.detach().double().flatten(1)
        if self.total is None:
            self.total, self.total_sq = torch.zeros_like(flat[0]), torch.zeros_like(flat[0])
        self.n += flat.shape[0]
        self.total += flat.sum(0)
        self.total_sq += (flat**2).sum(0)

    def mean(self) -> torch.Tensor:
        return self.total / max(self.n, 1)

    def variance(self) -> torch.Tensor:
        """Per-unit variance (population, i.e. divided by N)."""
        return (self.total_sq / max(self.n, 1) - self.mean() ** 2).clamp_min(0)


def active_units(posterior_means: RunningMoments, threshold: float = ACTIVE_THRESHOLD) -> int:
    return int((posterior_means.variance() > threshold).sum())


def gaussian_kl_full_vs_diagonal(
    mean0: torch.Tensor, cov0: torch.Tensor, mean1: torch.Tensor, var1: torch.Tensor
) -> float:
    """KL(N(mean0, cov0) || N(mean1, diag(var1))) in nats, for a full covariance cov0 (D, D).

    = 1/2 [tr(S1^-1 S0) + (m1 - m0)^T S1^-1 (m1 - m0) - D + log det S1 - log det S0]
    """
    d = mean0.numel()
    inv1 = 1.0 / var1
    _, logdet0 = torch.linalg.slogdet(cov0)
    value = 0.5 * (
        (torch.diagonal(cov0) * inv1).sum() + (((mean1 - mean0) ** 2) * inv1).sum() - d + torch.log(var1).sum() - logdet0
    )
    return float(value)


def fitted_gaussian(samples: torch.Tensor, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and covariance (D, D) of samples (N, D); a small ridge keeps it invertible when
    N is not much larger than D."""
    samples = samples.double()
    mean = samples.mean(0)
    centered = samples - mean
    cov = centered.T @ centered / max(samples.shape[0] - 1, 1)
    return mean, cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype)


def variance_ratio(generated: RunningMoments, real: RunningMoments) -> float:
    """Mean per-pixel variance of generated images over that of real images."""
    return float(generated.variance().mean() / real.variance().mean().clamp_min(1e-12))


def psnr(real: torch.Tensor, reconstructed: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, both uint8 (N, C, H, W)."""
    mse = ((real.double() - reconstructed.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(log_std)^2) summed per sample: (N, ...) -> (N,)."""
    per_unit = -0.5 * ((z - mean) * torch.exp(-log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    return per_unit.flatten(1).sum(1)
