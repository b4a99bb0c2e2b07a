"""The pretrained encoder: images in, latents out, loadable in one call.

In a hierarchical VAE the posterior of group i, q(z_i | x, z_<i), depends on the groups above
it, so "the encoder" is the bottom-up pass *and* the inference path of the top-down pass; only
the pixel likelihood head is left out. With ``sample=False`` (the default) every group passes
its posterior mean on, so the latents of an image are deterministic.

    from pipeline import Encoder
    encoder = Encoder.from_pretrained("runs/quickstart/encoder")
    latents = encoder(images)  # list of (N, Z, r, r), lowest resolution first
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import ModelConfig, config_from_dict
from pipeline.model.likelihood import to_unit_range
from pipeline.model.vae import VAE, BottomUp, GainBias, TopDown

WEIGHTS_NAME = "encoder.safetensors"
CONFIG_NAME = "config.json"


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

    @torch.no_grad()
    def forward(self, images: torch.Tensor, sample: bool = False) -> list[torch.Tensor]:
        """images: uint8 (N, C, H, W) in 0..255, or float already in [-1, 1].
        Returns one (N, Z, r, r) tensor per latent group: posterior means (or samples)."""
        x = to_unit_range(images.to(next(self.parameters()).device), self.cfg.data_bits)
        _, groups = self.top_down(self.bottom_up(x), x.shape[0], use_mean=not sample)
        return [g.z for g in groups]

    @classmethod
    def from_vae(cls, vae: VAE) -> "Encoder":
        encoder = cls(vae.cfg)
        weights = {k: v for k, v in vae.state_dict().items() if not k.startswith("likelihood.")}
        encoder.load_state_dict(weights, strict=True)
        return encoder

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = dataclasses.asdict(self.cfg)
        # The config rides in the safetensors metadata as well, so the weights file alone is
        # enough to rebuild the module (k-diffusion's habit).
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, directory / WEIGHTS_NAME, metadata={"model_config": json.dumps(config)})
        (directory / CONFIG_NAME).write_text(json.dumps({"model": config}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "Encoder":
        """The encoder saved in ``directory`` by ``save_pretrained``, in eval mode on ``device``.

        ``config.json`` is not trusted to fit the weights: the module is first built on the meta
        device (shapes, no memory) and every tensor's shape compared with the weights file's
        header, so a config that does not fit (say a width of 100000, ~1.8 TB of float32) fails
        at once with a ValueError naming the first differing tensor, before anything is allocated.
        """
        directory = Path(directory)
        model_cfg = config_from_dict(json.loads((directory / CONFIG_NAME).read_text())).model
        with torch.device("meta"):
            skeleton = cls(model_cfg)
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        # Layers added since older exports, which fill themselves in at the identity when absent.
        optional = {f"{name}.{tensor}" for name, module in skeleton.named_modules() if isinstance(module, GainBias)
                    for tensor in ("gain", "bias")}  # fmt: skip
        check_weights_fit(expected, directory / WEIGHTS_NAME, directory / CONFIG_NAME, optional)
        with torch.device(device):
            encoder = cls(model_cfg)
        encoder.load_state_dict(load_file(directory / WEIGHTS_NAME, device=str(device)), strict=True)
        return encoder.eval()


def check_weights_fit(expected: dict[str, tuple[int, ...]], weights: Path, config: Path,
                      optional: set[str] = frozenset()) -> None:  # fmt: skip
    """Compare the shapes a config builds (``expected``) with a safetensors file's header (read
    alone, no tensor data); ValueError naming the first tensor that differs, is missing (unless
    ``optional``) or is extra."""
    with safe_open(weights, "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for name, shape in expected.items():
        if name not in stored and name not in optional:
            raise ValueError(f"{config} does not fit {weights}: the config builds tensor {name!r} {list(shape)}, "
                             f"which is not in {weights.name}")  # fmt: skip
        if name in stored and stored[name] != shape:
            raise ValueError(f"{config} does not fit {weights}: tensor {name!r} is {list(shape)} by {config.name} "
                             f"and {list(stored[name])} in {weights.name}")  # fmt: skip
    extra = [name for name in stored if name not in expected]
    if extra:
        raise ValueError(f"{config} does not fit {weights}: {weights.name} holds tensor {extra[0]!r} "
                         f"{list(stored[extra[0]])}, which the config does not build ({len(extra)} such)")  # fmt: skip
