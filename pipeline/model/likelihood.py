"""p(x | z): how likely the decoder finds the real pixels, as a true code length.

Data of ``bits`` bits per sub-pixel (8 for ordinary images, 5 for VDVAE's FFHQ-256 setting, 1
for binarised images) has L = 2**bits values k = 0..L-1, mapped to x = 2k/(L-1) - 1 in [-1, 1]
(uint8 pixels are first reduced to their top ``bits`` bits). Every likelihood here is a
*discrete* distribution over those L values (the continuous densities are integrated over each
value's bin [x - h, x + h], h = 1/(L-1), the two end bins stretched to -inf and +inf), so the
masses sum to exactly 1 and -log p(x|z) is a code length in nats (Salimans et al. 2017,
PixelCNN++, eq. 2). Bits per dimension divide it by sub-pixels x ln 2.

* ``logistic_mixture`` (default): a mixture of K logistics per *pixel*; for RGB the green and
  blue means depend linearly on the red (and green) value (PixelCNN++ eq. 3), as in VDVAE.
* ``discretized_logistic`` / ``discretized_gaussian``: one distribution per sub-pixel.
* ``bernoulli``: 1-bit data, a Bernoulli per sub-pixel.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.model.blocks import conv

MIN_LOG_SCALE = -7.0
EDGE = 0.999  # x below -EDGE is the lowest value, above +EDGE the highest


def to_unit_range(images: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1] on the grid of ``bits``-bit values; float input
    is returned as is (taken to be on that grid already)."""
    if images.dtype != torch.uint8:
        return images
    levels = 2**bits
    values = images >> (8 - bits) if bits < 8 else images
    return values.float() * (2.0 / (levels - 1)) - 1.0


def to_uint8(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """float in [-1, 1] -> uint8 in 0..255 for display (nearest ``bits``-bit value, scaled up)."""
    levels = 2**bits
    values = ((x.clamp(-1, 1) + 1.0) * ((levels - 1) / 2)).round()
    return (values * (255.0 / (levels - 1))).round().to(torch.uint8)


def _interior_or_edges(x: torch.Tensor, log_lowest: torch.Tensor, log_highest: torch.Tensor, interior: torch.Tensor):
    return torch.where(x < -EDGE, log_lowest, torch.where(x > EDGE, log_highest, interior))


def _standardised_bin(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, half_width: float):
    """The bin's centre and edges in units of the scale: (middle, lower, upper)."""
    inv_scale = torch.exp(-log_scale)
    centered = x - mean
    return inv_scale * centered, inv_scale * (centered - half_width), inv_scale * (centered + half_width)


def discretized_logistic_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, half_width: float = 1.0 / 255.0
) -> torch.Tensor:
    """Log-probability of each value (elementwise, broadcasting); x must lie on the grid."""
    middle, lower, upper = _standardised_bin(x, mean, log_scale, half_width)
    cdf_delta = torch.sigmoid(upper) - torch.sigmoid(lower)
    # When the bin mass underflows (a very sharp logistic far from x), the density at the bin
    # centre times the bin width is an accurate stand-in and keeps gradients finite.
    log_density_mid = middle - log_scale - 2.0 * F.softplus(middle) + math.log(2 * half_width)
    interior = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)), log_density_mid)
    # log P(X <= upper edge) is the lowest value's mass; log P(X > lower edge) the highest's.
    return _interior_or_edges(x, F.logsigmoid(upper), -F.softplus(lower), interior)


def discretized_gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, half_width: float = 1.0 / 255.0
) -> torch.Tensor:
    """As ``discretized_logistic_log_prob``, with a Gaussian of std exp(log_scale)."""
    middle, lower, upper = _standardised_bin(x, mean, log_scale, half_width)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_cdf_lower = torch.special.log_ndtr(lower)
    # log(Phi(u) - Phi(l)) = log Phi(u) + log(1 - exp(log Phi(l) - log Phi(u))), stable for u > l.
    delta = (log_cdf_lower - log_cdf_upper).clamp_max(-1e-12)
    interior_exact = log_cdf_upper + torch.log(-torch.expm1(delta))
    log_density_mid = -0.5 * middle**2 - log_scale - 0.5 * math.log(2 * math.pi) + math.log(2 * half_width)
    interior = torch.where(interior_exact > math.log(1e-5), interior_exact, log_density_mid)
    return _interior_or_edges(x, log_cdf_upper, torch.special.log_ndtr(-lower), interior)


def _logistic_noise(like: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(like).clamp(1e-5, 1 - 1e-5)
    return torch.log(u) - torch.log1p(-u)


class PerSubpixel(nn.Module):
    """A logistic or Gaussian per sub-pixel: a 1x1 conv gives its mean and log-scale."""

    def __init__(self, width: int, channels: int, bits: int, family: str) -> None:
        super().__init__()
        self.channels, self.half_width, self.family = channels, 1.0 / (2**bits - 1), family
        self.proj = conv(width, 2 * channels, 1)

    def params(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_scale = self.proj(features).float().chunk(2, dim=1)
        return mean, log_scale.clamp_min(MIN_LOG_SCALE)

    def nll(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood in nats per image, shape (N,). x: (N, C, H, W) on the grid."""
        log_prob = discretized_logistic_log_prob if self.family == "logistic" else discretized_gaussian_log_prob
        mean, log_scale = self.params(features)
        return -log_prob(x, mean, log_scale, self.half_width).flatten(1).sum(1)

    def sample(self, features: torch.Tensor) -> torch.Tensor:
        mean, log_scale = self.params(features)
        noise = _logistic_noise(mean) if self.family == "logistic" else torch.randn_like(mean)
        return (mean + torch.exp(log_scale) * noise).clamp(-1, 1)

    def mode(self, features: torch.Tensor) -> torch.Tensor:
        return self.params(features)[0].clamp(-1, 1)


class LogisticMixture(nn.Module):
    """K logistics per pixel, mixed with per-pixel weights; RGB channels autoregressive.

    Output of the 1x1 conv, per pixel: K mixture logits, then C x K means, C x K log-scales,
    and (RGB only) 3 x K coefficients: green's mean + c0 * red, blue's + c1 * red + c2 * green.
    """

    def __init__(self, width: int, channels: int, bits: int, mixtures: int) -> None:
        super().__init__()
        self.channels, self.mixtures, self.half_width = channels, mixtures, 1.0 / (2**bits - 1)
        coefficients = 3 if channels == 3 else 0
        self.proj = conv(width, mixtures * (1 + 2 * channels + coefficients), 1)

    def params(self, features: torch.Tensor):
        """logits (N, K, H, W); means, log_scales (N, C, K, H, W); coeffs (N, 3, K, H, W) or None."""
        out = self.proj(features).float()
        n, _, h, w = out.shape
        k, c = self.mixtures, self.channels
        logits = out[:, :k]
        means = out[:, k : k + c * k].view(n, c, k, h, w)
        log_scales = out[:, k + c * k : k + 2 * c * k].view(n, c, k, h, w).clamp_min(MIN_LOG_SCALE)
        coeffs = torch.tanh(out[:, k + 2 * c * k :].view(n, 3, k, h, w)) if c == 3 else None
        return logits, means, log_scales, coeffs

    @staticmethod
    def _conditional_means(means: torch.Tensor, coeffs: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Means given the preceding channels' values x (N, C, 1 or K, H, W)."""
        if coeffs is None:
            return means
        red, green = x[:, 0], x[:, 1]
        return torch.stack(
            [means[:, 0], means[:, 1] + coeffs[:, 0] * red, means[:, 2] + coeffs[:, 1] * red + coeffs[:, 2] * green],
            dim=1,
        )

    def nll(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        logits, means, log_scales, coeffs = self.params(features)
        values = x.unsqueeze(2)  # (N, C, 1, H, W): the same value for every component
        means = self._conditional_means(means, coeffs, values)
        per_channel = discretized_logistic_log_prob(values, means, log_scales, self.half_width)
        log_mix = torch.logsumexp(F.log_softmax(logits, dim=1) + per_channel.sum(1), dim=1)  # (N, H, W)
        return -log_mix.flatten(1).sum(1)

    def _draw(self, features: torch.Tensor, noise_scale: float) -> torch.Tensor:
        logits, means, log_scales, coeffs = self.params(features)
        if noise_scale > 0:  # a component drawn by its weight (Gumbel-max)
            component = (logits - torch.log(-torch.log(torch.rand_like(logits).clamp(1e-5, 1 - 1e-5)))).argmax(1)
        else:
            component = logits.argmax(1)
        pick = F.one_hot(component, self.mixtures).permute(0, 3, 1, 2).unsqueeze(1).float()  # (N, 1, K, H, W)
        mean = (means * pick).sum(2)
        scale = torch.exp((log_scales * pick).sum(2))
        coeff = (coeffs * pick).sum(2) if coeffs is not None else None
        value = mean + noise_scale * scale * _logistic_noise(mean)  # (N, C, H, W), before the AR shift
        if coeff is None:
            return value.clamp(-1, 1)
        red = value[:, 0].clamp(-1, 1)
        green = (value[:, 1] + coeff[:, 0] * red).clamp(-1, 1)
        blue = (value[:, 2] + coeff[:, 1] * red + coeff[:, 2] * green).clamp(-1, 1)
        return torch.stack([red, green, blue], dim=1)

    def sample(self, features: torch.Tensor) -> torch.Tensor:
        return self._draw(features, 1.0)

    def mode(self, features: torch.Tensor) -> torch.Tensor:
        """The most probable component's means (channels conditioned on each other's means)."""
        return self._draw(features, 0.0)


class Bernoulli(nn.Module):
    """Binarised data (bits=1): one Bernoulli per sub-pixel, x = -1 or +1."""

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.proj = conv(width, channels, 1)

    def nll(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        logits = self.proj(features).float()
        return F.binary_cross_entropy_with_logits(logits, (x > 0).float(), reduction="none").flatten(1).sum(1)

    def sample(self, features: torch.Tensor) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(self.proj(features).float())) * 2 - 1

    def mode(self, features: torch.Tensor) -> torch.Tensor:
        return (self.proj(features).float() > 0).float() * 2 - 1


def make_likelihood(kind: str, width: int, channels: int, bits: int, mixtures: int) -> nn.Module:
    if kind == "logistic_mixture":
        return LogisticMixture(width, channels, bits, mixtures)
    if kind in ("discretized_logistic", "discretized_gaussian"):
        return PerSubpixel(width, channels, bits, kind.removeprefix("discretized_"))
    if kind == "bernoulli":
        return Bernoulli(width, channels)
    raise ValueError(f"unknown likelihood {kind!r}")
