"""The pretrained encoder: images in, latents out, loadable in one call.

In a hierarchical VAE the posterior of group i, q(z_i | x, z_<i), depends on the groups above
it, so "the encoder" is the bottom-up pass *and* the inference path of the top-down pass; only
the pixel likelihood head is left out. With ``sample=False`` (the default) every group passes
its posterior mean on, so the latents of an image are deterministic.

    from pipeline import Encoder
    encoder = Encoder.from_pretrained("runs/quickstart/encoder")
    latents = encoder(images)        # one LatentGroup per group, lowest resolution first
    latents[0].mean, latents[0].log_std, latents[0].shape

Images are uint8 (N, C, H, W) in 0..255, or float (N, C, H, W) in [-1, 1] (x = pixel / 127.5 - 1,
the likelihood's target; ``2 * x - 1`` for images in [0, 1]); a float batch outside [-1, 1] is
refused, since it is almost always 0..255 or 0..1 pixels passed by mistake.

This module and what it imports (config, model) need only torch, safetensors and numpy, the
package's base install; the training stack is the ``train`` extra.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import ModelConfig, config_from_dict
from pipeline.model.likelihood import to_unit_range
from pipeline.model.vae import VAE, BottomUp, TopDown
from pipeline.model_card import render_model_card

WEIGHTS_NAME = "encoder.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
FLOAT_RANGE = (-1.0, 1.0)


@dataclass(frozen=True)
class LatentGroup:
    """One latent group's posterior q(z_i | x, z_<i) for a batch."""

    index: int  # 0 = the top of the hierarchy (lowest resolution)
    resolution: int
    mean: torch.Tensor  # (N, Z, r, r)
    log_std: torch.Tensor  # (N, Z, r, r), natural log of the standard deviation
    sample: torch.Tensor | None = None  # (N, Z, r, r), only with ``sample=True``

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, r, r): one image's latent."""
        return tuple(self.mean.shape[1:])

    @property
    def z(self) -> torch.Tensor:
        """What the top-down pass passed on to the groups below: the sample, else the mean."""
        return self.mean if self.sample is None else self.sample


class Latents(list):
    """The encoder's result: a list of ``LatentGroup``, lowest resolution first."""

    @property
    def tensors(self) -> list[torch.Tensor]:
        """One (N, Z, r, r) tensor per group, as ``Encoder.__call__`` returned before it returned
        records: the samples with ``sample=True``, else the means."""
        return [group.z for group in self]


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Same attribute names as in VAE, so the VAE's weights load with strict=True.
        self.bottom_up = BottomUp(cfg)
        self.top_down = TopDown(cfg)

    @property
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(channels, height, width) of each group's latent, in the order returned."""
        return [(b.latent_channels, b.resolution, b.resolution) for b in self.top_down.blocks]

    def prepare(self, images: torch.Tensor | Any) -> torch.Tensor:
        """uint8 0..255 or float [-1, 1] images (a tensor or a numpy array, (N, C, H, W)) -> the
        float [-1, 1] input of the bottom-up pass, on the encoder's device."""
        images = torch.as_tensor(images)
        cfg = self.cfg
        expected = (cfg.channels, cfg.resolution, cfg.resolution)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be (N, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            if not images.is_floating_point():
                raise ValueError(f"images must be uint8 (0..255) or float ([-1, 1]), got {images.dtype}")
            low, high = FLOAT_RANGE
            if images.numel() and (images.min() < low or images.max() > high):
                raise ValueError(f"float images must lie in [-1, 1] (pixel / 127.5 - 1), got values in "
                                 f"[{images.min().item():.3g}, {images.max().item():.3g}]; pass uint8 0..255 "
                                 f"pixels as they are, and [0, 1] images as 2 * x - 1")  # fmt: skip
            images = images.float()
        return to_unit_range(images.to(self.bottom_up.stem.weight.device), cfg.data_bits)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, sample: bool = False) -> Latents:
        """One ``LatentGroup`` per latent group (posterior mean and log-std; with ``sample=True``
        each group passes a posterior sample on, and ``.sample`` holds it)."""
        x = self.prepare(images)
        _, groups = self.top_down(self.bottom_up(x), x.shape[0], use_mean=not sample)
        return Latents(
            LatentGroup(i, block.resolution, g.posterior_mean, g.posterior_log_std, g.z if sample else None)
            for i, (block, g) in enumerate(zip(self.top_down.blocks, groups))
        )

    def latents(self, images: torch.Tensor, sample: bool = False) -> list[torch.Tensor]:
        """The old return value: one (N, Z, r, r) tensor per group (means, or samples)."""
        return self(images, sample=sample).tensors

    @classmethod
    def from_vae(cls, vae: VAE) -> "Encoder":
        encoder = cls(vae.cfg)
        weights = {k: v for k, v in vae.state_dict().items() if not k.startswith("likelihood.")}
        encoder.load_state_dict(weights, strict=True)
        return encoder

    def describe(self) -> dict[str, Any]:
        """What ``config.json`` says besides the model config: the input it takes, the latents
        it returns (for readers that do not build the model)."""
        cfg = self.cfg
        standardized = bool(cfg.standardize_input and cfg.input_mean)
        return {
            "input": {
                "resolution": cfg.resolution, "channels": cfg.channels, "bits": cfg.data_bits,
                "dtypes": {"uint8": [0, 255], "float": list(FLOAT_RANGE)},
                "standardized": standardized,
                # (pixel - input_mean) / input_std, per channel, on the pixel scale 0..255.
                "input_mean": cfg.input_mean if standardized else [127.5] * cfg.channels,
                "input_std": cfg.input_std if standardized else [127.5] * cfg.channels,
            },
            "latents": {
                "order": "lowest resolution (top of the hierarchy) first",
                "returned": ["mean", "log_std", "sample (with sample=True)"],
                "groups": [{"group": i, "resolution": r, "shape": [z, r, r]}
                           for i, (z, r, _) in enumerate(self.latent_shapes)],
            },  # fmt: skip
        }

    def save_pretrained(self, directory: str | Path, training: dict[str, Any] | None = None) -> None:
        """Weights, ``config.json`` and a model card ``README.md``. ``training``: what the trainer
        knows of the run (data, steps, device-hours, the final report), for the card."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = dataclasses.asdict(self.cfg)
        # The config rides in the safetensors metadata as well, so the weights file alone is
        # enough to rebuild the module (k-diffusion's habit).
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, directory / WEIGHTS_NAME, metadata={"model_config": json.dumps(config)})
        parameters = sum(t.numel() for t in tensors.values())
        document = {"format_version": FORMAT_VERSION, "model": config, "parameters": parameters, **self.describe()}
        if training is not None:
            document["training"] = training
        (directory / CONFIG_NAME).write_text(json.dumps(document, indent=2) + "\n")
        (directory / CARD_NAME).write_text(render_model_card(document))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "Encoder":
        """The encoder saved in ``directory`` by ``save_pretrained``, in eval mode on ``device``.

        ``config.json`` is not trusted to fit the weights: the module is first built on the meta
        device (shapes, no memory) and every tensor's shape compared with the weights file's
        header, so a config that does not fit (say a width of 100000, ~1.8 TB of float32) fails
        at once with a ValueError naming the first differing tensor, before anything is allocated.
        """
        directory = Path(directory)
        # Only the model section builds the module; the rest describes it for other readers.
        model_cfg = config_from_dict({"model": json.loads((directory / CONFIG_NAME).read_text())["model"]}).model
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in cls(model_cfg).state_dict().items()}
        # Encoders exported before the output gain and bias existed lack both; they load at the
        # identity (GainBias._load_from_state_dict), so their absence is no misfit.
        optional = {"top_down.output_gain_bias.gain", "top_down.output_gain_bias.bias"}
        check_weights_fit(expected, directory / WEIGHTS_NAME, directory / CONFIG_NAME, optional)
        with torch.device(device):
            encoder = cls(model_cfg)
        encoder.load_state_dict(load_file(directory / WEIGHTS_NAME, device=str(device)), strict=True)
        return encoder.eval()


def check_weights_fit(expected: dict[str, tuple[int, ...]], weights: Path, config: Path,
                      optional: set[str] = frozenset()) -> None:  # fmt: skip
    """Compare the shapes a config builds (``expected``) with a safetensors file's header (read
    alone, no tensor data); ValueError naming the first tensor that differs, is missing or is extra.
    The ``optional`` tensors may be missing, all together (the module fills them in)."""
    with safe_open(weights, "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if optional and not optional & stored.keys():
        expected = {k: v for k, v in expected.items() if k not in optional}
    for name, shape in expected.items():
        if name not in stored:
            raise ValueError(f"{config} does not fit {weights}: the config builds tensor {name!r} {list(shape)}, "
                             f"which is not in {weights.name}")  # fmt: skip
        if stored[name] != shape:
            raise ValueError(f"{config} does not fit {weights}: tensor {name!r} is {list(shape)} by {config.name} "
                             f"and {list(stored[name])} in {weights.name}")  # fmt: skip
    extra = [name for name in stored if name not in expected]
    if extra:
        raise ValueError(f"{config} does not fit {weights}: {weights.name} holds tensor {extra[0]!r} "
                         f"{list(stored[extra[0]])}, which the config does not build ({len(extra)} such)")  # fmt: skip
