"""Residual convolution cells and the VDVAE block-string notation that arranges them."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class EncoderBlockSpec:
    resolution: int
    down_rate: int | None  # average-pool by this factor after the block


@dataclass(frozen=True)
class DecoderBlockSpec:
    resolution: int
    merge_from: int | None  # up-sample the state of this resolution and add it first


_TOKEN = re.compile(r"^(\d+)([xdm])(\d+)$")


def _tokens(spec: str, what: str) -> list[tuple[int, str, int]]:
    out = []
    for token in spec.replace(" ", "").split(","):
        match = _TOKEN.match(token)
        if not match:
            raise ValueError(f"{what} block '{token}' in '{spec}': expected RxN, RdK or RmS (e.g. 32x2, 32d2, 16m8)")
        out.append((int(match[1]), match[2], int(match[3])))
    return out


def parse_encoder_blocks(spec: str, resolution: int) -> list[EncoderBlockSpec]:
    """``"32x2,32d2,16x1"`` -> specs of 2 blocks at 32, one at 32 pooling by 2, one at 16."""
    blocks: list[EncoderBlockSpec] = []
    current = resolution
    for res, kind, n in _tokens(spec, "encoder"):
        if res != current:
            raise ValueError(f"encoder block '{res}{kind}{n}' works at {res}px but the image is {current}px at that point")
        if kind == "x":
            blocks += [EncoderBlockSpec(res, None)] * n
        elif kind == "d":
            if n < 2 or res % n:
                raise ValueError(f"encoder block '{res}d{n}': {res} is not divisible by the rate {n}")
            blocks.append(EncoderBlockSpec(res, n))
            current = res // n
        else:
            raise ValueError(f"encoder block '{res}m{n}': merges belong to the decoder")
    return blocks


def parse_decoder_blocks(spec: str, resolution: int) -> list[DecoderBlockSpec]:
    """``"4x1,8m4,8x1"`` -> one block at 4, a block at 8 merging the up-sampled 4 state, one at 8."""
    blocks: list[DecoderBlockSpec] = []
    seen: set[int] = set()
    for res, kind, n in _tokens(spec, "decoder"):
        if kind == "x":
            blocks += [DecoderBlockSpec(res, None)] * n
        elif kind == "m":
            if n not in seen:
                raise ValueError(f"decoder block '{res}m{n}': no earlier block at {n}px to merge from")
            if res <= n or res % n:
                raise ValueError(f"decoder block '{res}m{n}': {res} must be a multiple of {n}")
            blocks.append(DecoderBlockSpec(res, n))
        else:
            raise ValueError(f"decoder block '{res}d{n}': down-sampling belongs to the encoder")
        if seen and res not in seen and kind != "m":
            raise ValueError(f"decoder block '{res}{kind}{n}': reach a new resolution with a merge block (e.g. {res}m<lower>)")
        seen.add(res)
    if blocks and blocks[-1].resolution != resolution:
        raise ValueError(f"the decoder must end at the image resolution {resolution}, it ends at {blocks[-1].resolution}")
    return blocks


def check_architecture(encoder: list[EncoderBlockSpec], decoder: list[DecoderBlockSpec]) -> None:
    """Every decoder resolution needs bottom-up features of the same resolution."""
    encoded = {b.resolution for b in encoder} | {b.resolution // b.down_rate for b in encoder if b.down_rate}
    for block in decoder:
        if block.resolution not in encoded:
            raise ValueError(f"decoder works at {block.resolution}px, which the encoder never reaches ({sorted(encoded)})")


def conv(in_channels: int, out_channels: int, kernel: int = 1) -> nn.Conv2d:
    """A same-size convolution whose bias starts at zero (VDVAE's get_conv).

    PyTorch's default bias is uniform in +-1/sqrt(fan_in): a fixed, data-blind offset per
    channel. In the heads it shifts every group's posterior away from its prior before training
    starts (KL that training must purge, often past the point of collapse); in the residual
    stream it is a constant that the 1/sqrt(depth) scaling of a block's weights does not touch.
    Every conv of the model is made here so none keeps that offset.
    """
    layer = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    with torch.no_grad():
        layer.bias.zero_()
    return layer


class ResidualBlock(nn.Module):
    """VDVAE's bottleneck cell: 1x1 in, two 3x3, 1x1 out, GELU before each conv.

    At 1x1 and 2x2 resolution the 3x3 convs become 1x1 (a 3x3 kernel would see mostly padding).
    ``residual=False`` makes it a plain conv stack, used for the prior and posterior heads.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        resolution: int,
        residual: bool = True,
        down_rate: int | None = None,
        zero_last: bool = False,
        last_scale: float = 1.0,
    ) -> None:
        super().__init__()
        kernel = 3 if resolution > 2 else 1
        self.residual = residual
        self.down_rate = down_rate
        self.convs = nn.ModuleList(
            [
                conv(in_channels, hidden_channels, 1),
                conv(hidden_channels, hidden_channels, kernel),
                conv(hidden_channels, hidden_channels, kernel),
                conv(hidden_channels, out_channels, 1),
            ]
        )
        last = self.convs[-1]
        with torch.no_grad():
            if zero_last:
                # A zero prior output starts p(z) at N(0, 1) and adds nothing to the state
                # (the bias is zero already, as in every conv).
                last.weight.zero_()
            else:
                # VDVAE: scale the last conv by 1/sqrt(depth) so the residual stream's variance
                # does not grow with the number of blocks.
                last.weight.mul_(last_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in, H, W) -> (N, out, H, W), or (N, out, H/rate, W/rate) when down-sampling."""
        h = x
        for layer in self.convs:
            h = layer(F.gelu(h))
        out = x + h if self.residual else h
        if self.down_rate:
            out = F.avg_pool2d(out, self.down_rate)
        return out
