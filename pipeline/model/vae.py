"""A hierarchical VAE in the VDVAE family (Child 2021).

``BottomUp`` turns an image into features at every resolution. ``TopDown`` starts from a
learned constant at the lowest resolution and, block by block, computes the prior
p(z_i | z_<i) from its running state, the posterior q(z_i | x, z_<i) from that state and the
bottom-up features of the same resolution, draws z_i (reparameterised: mean + std * noise) and
adds it back into the state. Each top-down block is one latent group. The final state feeds the
pixel likelihood. Generation runs the same top-down pass with z_i drawn from the prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.config import ModelConfig
from pipeline.model.blocks import DecoderBlockSpec, ResidualBlock, conv, parse_decoder_blocks, parse_encoder_blocks
from pipeline.model.likelihood import make_likelihood, to_unit_range
from pipeline.model.noise import standard_normal_like
from pipeline.objective import gaussian_kl, negative_elbo, soft_clamp


def _run(block: nn.Module, grad_checkpoint: bool, *args):
    """Call a block, through activation checkpointing when training asks for it. The RNG state
    is replayed in the recomputation, so posterior samples (and gradients) are unchanged."""
    if grad_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def _hidden(width: int, cfg: ModelConfig) -> int:
    return max(1, int(width * cfg.bottleneck_ratio))


def input_standardization(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, C, 1, 1), that turn the likelihood's target x in [-1, 1] into
    the encoder's input (p - mean) / std, p = (x + 1) * 127.5 being the pixel value 0..255.

    Working from x rather than from the uint8 pixels keeps one entry point for uint8 and float
    images, and a ``data_bits`` < 8 model's encoder sees the values it models. Without
    statistics (or with ``standardize_input`` off) it is the identity: mean = std = 127.5."""
    channels = cfg.channels
    use = cfg.standardize_input and cfg.input_mean
    mean = torch.tensor(cfg.input_mean if use else [127.5] * channels, dtype=torch.float32)
    std = torch.tensor(cfg.input_std if use else [127.5] * channels, dtype=torch.float32)
    return (127.5 / std).view(1, channels, 1, 1), ((127.5 - mean) / std).view(1, channels, 1, 1)


class BottomUp(nn.Module):
    """Image -> features per resolution: ``{"32": (N, W32, 32, 32), "16": ..., "4": ...}`` (string
    keys: DeepSpeed's ZeRO-3 hooks walk module outputs and expect a dict's keys to be names)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        specs = parse_encoder_blocks(cfg.encoder_blocks, cfg.resolution)
        self.grad_checkpoint = cfg.grad_checkpoint
        # Not saved in the state dict: the config holds the statistics (so checkpoints and
        # exported encoders from before them still load); buffers follow the model's device.
        scale, shift = input_standardization(cfg)
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)
        self.stem = conv(cfg.channels, cfg.width_at(cfg.resolution), 3)
        scale = 1.0 / math.sqrt(len(specs))
        blocks, projections = [], {}
        for i, s in enumerate(specs):
            w = cfg.width_at(s.resolution)
            blocks.append(ResidualBlock(w, _hidden(w, cfg), w, s.resolution, down_rate=s.down_rate, last_scale=scale))
            if s.down_rate and cfg.width_at(s.resolution // s.down_rate) != w:
                # A new resolution with other channels: a 1x1 projection after the pooling.
                projections[str(i)] = conv(w, cfg.width_at(s.resolution // s.down_rate), 1)
        self.blocks = nn.ModuleList(blocks)
        self.projections = nn.ModuleDict(projections)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (N, C, H, W) in [-1, 1], the likelihood's target; standardised here."""
        h = self.stem(x * self.input_scale + self.input_shift)
        features = {str(h.shape[-1]): h}
        for i, block in enumerate(self.blocks):
            h = _run(block, self.grad_checkpoint, h)
            if str(i) in self.projections:
                h = self.projections[str(i)](h)
            features[str(h.shape[-1])] = h  # the last block at each resolution wins
        return features


@dataclass
class GroupOutput:
    """What one latent group produced for a batch."""

    z: torch.Tensor  # (N, Z, r, r) the sample passed on
    kl: torch.Tensor | None  # (N,) nats, None when sampling from the prior
    posterior_mean: torch.Tensor | None  # (N, Z, r, r)
    posterior_log_std: torch.Tensor | None
    prior_mean: torch.Tensor
    prior_log_std: torch.Tensor


class TopDownBlock(nn.Module):
    """One latent group: prior and posterior heads, the z projection, a residual cell."""

    def __init__(self, spec: DecoderBlockSpec, cfg: ModelConfig, n_blocks: int) -> None:
        super().__init__()
        w = cfg.width_at(spec.resolution)
        h, z = _hidden(w, cfg), cfg.latent_channels
        self.resolution = spec.resolution
        self.merge_from = spec.merge_from
        self.latent_channels = z
        self.log_std_clamp = cfg.log_std_clamp
        scale = 1.0 / math.sqrt(n_blocks)
        self.posterior = ResidualBlock(2 * w, h, 2 * z, spec.resolution, residual=False)
        # The prior also emits an update of the state, so the state can carry what z_<i said.
        self.prior = ResidualBlock(w, h, 2 * z + w, spec.resolution, residual=False, zero_last=True)
        self.z_proj = conv(z, w, 1)
        with torch.no_grad():
            self.z_proj.weight.mul_(scale)
        self.cell = ResidualBlock(w, h, w, spec.resolution, last_scale=scale)

    def forward(
        self,
        state: torch.Tensor,
        features: torch.Tensor | None,
        temperature: float = 1.0,
        use_mean: bool = False,
    ) -> tuple[torch.Tensor, GroupOutput]:
        """state: (N, W, r, r). features: bottom-up (N, W, r, r), or None to sample the prior.
        ``use_mean`` passes the posterior (or prior) mean on instead of a sample."""
        prior_mean, prior_log_std, state_update = self.prior(state).split(
            [self.latent_channels, self.latent_channels, state.shape[1]], dim=1
        )
        # The distributions in float32 under any precision: exp() of a bf16 log-std and a KL
        # summed over thousands of units are where low precision would bite.
        prior_mean = prior_mean.float()
        prior_log_std = soft_clamp(prior_log_std.float(), self.log_std_clamp)
        if features is None:
            z = prior_mean if use_mean else prior_mean + temperature * torch.exp(prior_log_std) * standard_normal_like(prior_mean)
            out = GroupOutput(z, None, None, None, prior_mean, prior_log_std)
        else:
            post_mean, post_log_std = self.posterior(torch.cat([state, features], dim=1)).float().chunk(2, dim=1)
            post_log_std = soft_clamp(post_log_std, self.log_std_clamp)
            z = post_mean if use_mean else post_mean + torch.exp(post_log_std) * standard_normal_like(post_mean)
            kl = gaussian_kl(post_mean, post_log_std, prior_mean, prior_log_std)
            out = GroupOutput(z, kl.flatten(1).sum(1), post_mean, post_log_std, prior_mean, prior_log_std)
        state = state + state_update
        # Back to the weights' dtype: DeepSpeed's bf16 / fp16 casts the weights, not the inputs.
        state = self.cell(state + self.z_proj(z.to(self.z_proj.weight.dtype)))
        return state, out


class GainBias(nn.Module):
    """A learned per-channel gain and bias on the final top-down state, before the likelihood
    (VDVAE's ``gain``/``bias`` in its decoder's ``final_fn``): it lets the likelihood head see
    the state at the scale it needs without the residual cells growing to provide it. Starts
    as the identity (gain 1, bias 0)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain + self.bias

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints and exported encoders from before this layer existed have neither
        # tensor; they were trained with what is the identity here, so they load unchanged.
        if prefix + "gain" not in state_dict and prefix + "bias" not in state_dict:
            state_dict[prefix + "gain"] = torch.ones_like(self.gain)
            state_dict[prefix + "bias"] = torch.zeros_like(self.bias)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TopDown(nn.Module):
    """Runs the latent groups from the lowest resolution up to the image resolution."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        specs = parse_decoder_blocks(cfg.decoder_blocks, cfg.resolution)
        self.resolution = cfg.resolution
        self.grad_checkpoint = cfg.grad_checkpoint
        self.blocks = nn.ModuleList(TopDownBlock(s, cfg, len(specs)) for s in specs)
        # A learned starting state per resolution (VDVAE's bias_xs); keys must be strings.
        resolutions = sorted({s.resolution for s in specs})
        self.initial_state = nn.ParameterDict(
            {str(r): nn.Parameter(torch.zeros(1, cfg.width_at(r), r, r)) for r in resolutions
             if r <= cfg.state_bias_max_resolution}
        )  # fmt: skip
        self.widths = {r: cfg.width_at(r) for r in resolutions}
        # Merging a lower resolution's state into one with other channels: a 1x1 projection.
        self.merge_projections = nn.ModuleDict(
            {f"{s.merge_from}to{s.resolution}": conv(cfg.width_at(s.merge_from), cfg.width_at(s.resolution), 1)
             for s in specs if s.merge_from is not None and cfg.width_at(s.merge_from) != cfg.width_at(s.resolution)}
        )  # fmt: skip
        self.output_gain_bias = GainBias(cfg.width_at(cfg.resolution))

    def forward(
        self,
        features: dict[str, torch.Tensor] | None,
        batch_size: int,
        temperature: float | list[float] = 1.0,
        use_mean: bool = False,
    ) -> tuple[torch.Tensor, list[GroupOutput]]:
        """Returns the final (N, W, H, W) state (after the output gain and bias) and one
        GroupOutput per latent group.

        ``temperature`` may be one number or one per group (used only when sampling the prior).
        """
        temperatures = temperature if isinstance(temperature, list) else [temperature] * len(self.blocks)
        reference = next(self.parameters())
        states = {
            r: self.initial_state[str(r)].expand(batch_size, -1, -1, -1) if str(r) in self.initial_state
            else reference.new_zeros(batch_size, w, r, r)
            for r, w in self.widths.items()
        }  # fmt: skip
        groups = []
        for block, t in zip(self.blocks, temperatures):
            state = states[block.resolution]
            if block.merge_from is not None:
                low = states[block.merge_from]
                key = f"{block.merge_from}to{block.resolution}"
                if key in self.merge_projections:
                    low = self.merge_projections[key](low)
                state = state + F.interpolate(low, scale_factor=block.resolution // block.merge_from, mode="nearest")
            block_features = None if features is None else features[str(block.resolution)]
            state, group = _run(block, self.grad_checkpoint, state, block_features, t, use_mean)
            states[block.resolution] = state
            groups.append(group)
        return self.output_gain_bias(states[self.resolution]), groups


class VAE(nn.Module):
    """The whole model. ``forward`` returns the loss in bits/dim and its parts."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bottom_up = BottomUp(cfg)
        self.top_down = TopDown(cfg)
        self.likelihood = make_likelihood(
            cfg.likelihood, cfg.width_at(cfg.resolution), cfg.channels, cfg.data_bits, cfg.mixtures
        )

    def _as_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input in the weights' dtype: bf16 or fp16 where DeepSpeed casts the
        weights themselves instead of autocasting (the likelihood's target stays float32)."""
        return x.to(self.bottom_up.stem.weight.dtype)

    @property
    def num_groups(self) -> int:
        return len(self.top_down.blocks)

    def forward(self, images: torch.Tensor, kl_weight: float = 1.0, free_bits: float = 0.0) -> dict[str, torch.Tensor]:
        """images: uint8 (N, C, H, W). Returns ``loss`` (the training objective, bits/dim),
        ``nelbo`` (the negative ELBO, bits/dim), ``recon_bpd``, ``kl_bpd``, ``kl_bpd_per_group``
        (G,); see ``objective.negative_elbo`` for the weight and free bits."""
        x = to_unit_range(images, self.cfg.data_bits)
        state, groups = self.top_down(self.bottom_up(self._as_weights(x)), x.shape[0])
        recon_nats = self.likelihood.nll(state, x)
        return negative_elbo(recon_nats, [g.kl for g in groups], x[0].numel(), kl_weight, free_bits)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> reconstructions in [-1, 1] (posterior sample, likelihood mode)."""
        x = to_unit_range(images, self.cfg.data_bits)
        state, _ = self.top_down(self.bottom_up(self._as_weights(x)), x.shape[0])
        return self.likelihood.mode(state)

    @torch.no_grad()
    def sample(self, n: int, temperature: float | list[float] = 1.0) -> torch.Tensor:
        """n images from the prior, in [-1, 1]; lower temperatures give smoother images."""
        state, _ = self.top_down(None, n, temperature)
        return self.likelihood.mode(state)


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the model a config describes, without allocating them."""
    with torch.device("meta"):
        return sum(p.numel() for p in VAE(cfg).parameters())
