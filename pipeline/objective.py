"""The ELBO and its units.

The loss is the negative ELBO, -log p(x|z) + sum_i KL(q(z_i|x,z_<i) || p(z_i|z_<i)), in
**bits per dimension**: nats per image divided by (channels x height x width x ln 2), i.e. per
sub-pixel, the unit VAE papers report (VDVAE: 2.87 on CIFAR-10). Because the likelihood is a
discrete distribution over the 256 pixel values, this is a code length, comparable across
models; a model that knows nothing about the data (uniform over 256 values) scores 8.0.
"""

from __future__ import annotations

import math

import torch


def gaussian_kl(mean_q: torch.Tensor, log_std_q: torch.Tensor, mean_p: torch.Tensor, log_std_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_q, std_q^2) || N(mean_p, std_p^2)) per element, in nats.

    = log(std_p / std_q) + (std_q^2 + (mean_q - mean_p)^2) / (2 std_p^2) - 1/2
    """
    return (
        log_std_p
        - log_std_q
        + 0.5 * (torch.exp(2 * log_std_q) + (mean_q - mean_p) ** 2) * torch.exp(-2 * log_std_p)
        - 0.5
    )


def nats_to_bits_per_dim(nats_per_image: torch.Tensor, dims: int) -> torch.Tensor:
    """nats per image -> bits per sub-pixel."""
    return nats_per_image / (dims * math.log(2.0))


def negative_elbo(recon_nats: torch.Tensor, kl_nats_per_group: list[torch.Tensor], dims: int) -> dict[str, torch.Tensor]:
    """Assemble the loss from per-image parts.

    recon_nats: (N,) -log p(x|z); kl_nats_per_group: one (N,) tensor per latent group;
    dims: sub-pixels per image. Returns batch means in bits/dim: ``loss`` (with gradients),
    ``recon_bpd``, ``kl_bpd`` and ``kl_bpd_per_group`` (G,) (detached, for logging).
    """
    kl_per_group = torch.stack(kl_nats_per_group, dim=1)  # (N, G)
    recon_bpd = nats_to_bits_per_dim(recon_nats, dims).mean()
    kl_bpd_per_group = nats_to_bits_per_dim(kl_per_group, dims).mean(0)
    loss = recon_bpd + kl_bpd_per_group.sum()
    return {
        "loss": loss,
        "recon_bpd": recon_bpd.detach(),
        "kl_bpd": kl_bpd_per_group.sum().detach(),
        "kl_bpd_per_group": kl_bpd_per_group.detach(),
    }
