"""Image grids for people to look at: samples and reconstructions as one PNG."""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange
from PIL import Image

from pipeline.model.likelihood import to_uint8


def save_grid(rows: list[torch.Tensor], path: str | Path, scale: int = 2, bits: int = 8) -> Path:
    """Each row: (N, C, H, W) in [-1, 1] (``bits``-bit data) or uint8; rows of equal N are
    stacked top to bottom."""
    tiles = torch.stack([row.cpu() if row.dtype == torch.uint8 else to_uint8(row.float().cpu(), bits) for row in rows])
    grid = rearrange(tiles, "r n c h w -> (r h) (n w) c").numpy()
    image = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def sample_and_reconstruction_grid(model, real: torch.Tensor, path: str | Path, per_row: int = 16) -> Path:
    """Rows: real images, their reconstructions, then two rows of samples at temperatures 1.0
    and 0.8 (lower temperature: smoother, more typical images)."""
    real = real[:per_row]
    n = real.shape[0]
    rows = [real, model.reconstruct(real), model.sample(n, 1.0), model.sample(n, 0.8)]
    return save_grid(rows, path, bits=model.cfg.data_bits)

