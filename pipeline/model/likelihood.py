"""p(x | z): how likely the decoder finds the real 8-bit pixels.

Pixels are uint8 values k in 0..255, mapped to x = k / 127.5 - 1 in [-1, 1]. Each sub-pixel
(one channel of one pixel) gets a logistic distribution with its own mean and scale, and the
probability of value k is the logistic mass on k's bin [x - 1/255, x + 1/255]; the two end bins
stretch to -inf and +inf so that the 256 masses sum to exactly 1 (Salimans et al. 2017,
PixelCNN++, eq. 2). This makes the negative log-likelihood a true code length in nats.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

BIN_HALF_WIDTH = 1.0 / 255.0
MIN_LOG_SCALE = -7.0


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) in 0..255 -> float in [-1, 1]; float input is returned as is."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    return images


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 in 0..255 (rounded to the nearest bin)."""
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-probability of each sub-pixel, shape of ``x``; x must lie on the 256-bin grid."""
    inv_scale = torch.exp(-log_scale)
    centered = x - mean
    upper = inv_scale * (centered + BIN_HALF_WIDTH)
    lower = inv_scale * (centered - BIN_HALF_WIDTH)
    log_cdf_upper = F.logsigmoid(upper)  # log P(X <= upper edge): the whole mass of bin 0
    log_one_minus_cdf_lower = -F.softplus(lower)  # log P(X > lower edge): the whole mass of bin 255
    cdf_delta = torch.sigmoid(upper) - torch.sigmoid(lower)
    # When the bin mass underflows (a very sharp logistic far from x), the density at the bin
    # centre times the bin width is an accurate stand-in and keeps gradients finite.
    middle = inv_scale * centered
    log_density_mid = middle - log_scale - 2.0 * F.softplus(middle) + math.log(2 * BIN_HALF_WIDTH)
    interior = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)), log_density_mid)
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, interior))


class DiscretizedLogistic(nn.Module):
    """1x1 conv from decoder features to a mean and a log-scale per sub-pixel."""

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.proj = nn.Conv2d(width, 2 * channels, 1)

    def params(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_scale = self.proj(features).float().chunk(2, dim=1)
        return mean, log_scale.clamp_min(MIN_LOG_SCALE)

    def nll(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood in nats per image, shape (N,). x: (N, C, H, W) in [-1, 1]."""
        mean, log_scale = self.params(features)
        return -discretized_logistic_log_prob(x, mean, log_scale).flatten(1).sum(1)

    def sample(self, features: torch.Tensor) -> torch.Tensor:
        """Draw images in [-1, 1]: mean + scale * logistic noise."""
        mean, log_scale = self.params(features)
        u = torch.rand_like(mean).clamp(1e-5, 1 - 1e-5)
        return (mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))).clamp(-1, 1)

    def mode(self, features: torch.Tensor) -> torch.Tensor:
        """The most likely image in [-1, 1] (a logistic's mode is its mean)."""
        mean, _ = self.params(features)
        return mean.clamp(-1, 1)
