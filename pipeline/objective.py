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


def negative_elbo(
    recon_nats: torch.Tensor,
    kl_nats_per_group: list[torch.Tensor],
    dims: int,
    kl_weight: float = 1.0,
    free_bits: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Assemble the loss from per-image parts.

    recon_nats: (N,) -log p(x|z); kl_nats_per_group: one (N,) tensor per latent group;
    dims: sub-pixels per image. Returns batch means in bits/dim: ``loss``, the training
    objective (with gradients), and, detached for logging, ``nelbo`` (the true bound:
    recon + KL, whatever the weight and free bits), ``recon_bpd``, ``kl_bpd`` and
    ``kl_bpd_per_group`` (G,).

    ``kl_weight`` scales the KL in the objective (warm-up). ``free_bits``: a group whose
    batch-mean KL is below this many bits per image contributes that floor instead, with no
    gradient pushing it lower (Kingma et al. 2016, eq. 15).
    """
    kl_per_group = torch.stack(kl_nats_per_group, dim=1)  # (N, G)
    recon_bpd = nats_to_bits_per_dim(recon_nats, dims).mean()
    kl_bpd_per_group = nats_to_bits_per_dim(kl_per_group, dims).mean(0)
    penalised = kl_bpd_per_group.clamp_min(free_bits / dims) if free_bits > 0 else kl_bpd_per_group
    loss = recon_bpd + kl_weight * penalised.sum()
    kl_bpd = kl_bpd_per_group.sum().detach()
    return {
        "loss": loss,
        "nelbo": recon_bpd.detach() + kl_bpd,
        "recon_bpd": recon_bpd.detach(),
        "kl_bpd": kl_bpd,
        "kl_bpd_per_group": kl_bpd_per_group.detach(),
    }


def soft_clamp(x: torch.Tensor, limit: float) -> torch.Tensor:
    """limit * tanh(x / limit): the identity near 0, never beyond +-limit, smooth everywhere."""
    return limit * torch.tanh(x / limit) if limit > 0 else x


def kl_warmup_weight(step: int, warmup_steps: int) -> float:
    """Weight of the KL term at ``step``: rises linearly to 1 over ``warmup_steps`` (0: always 1)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
