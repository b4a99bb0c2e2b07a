"""Loading what a training run left: the newest (or a named) checkpoint as a ready model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.checkpoint import latest_checkpoint, load_checkpoint, load_ema
from pipeline.config import Config, config_from_dict
from pipeline.model import VAE


def load_trained(run_dir: Path, checkpoint: str | None = None, weights: str = "ema") -> tuple[VAE, Config, dict[str, Any], Path]:
    """(model in eval mode, its config, the checkpoint's state.json, the checkpoint path).

    ``checkpoint``: a checkpoint directory or its name under <run_dir>/checkpoints (default: the
    newest). ``weights``: ``ema`` (the moving average, falling back to the live weights for a
    checkpoint without one) or ``live``.
    """
    root = Path(run_dir) / "checkpoints"
    if checkpoint is None:
        path = latest_checkpoint(root)
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {root}")
    else:
        path = Path(checkpoint) if Path(checkpoint).is_dir() else root / checkpoint
        if not path.is_dir():
            raise FileNotFoundError(f"no checkpoint {checkpoint} (looked in {root})")
    model_state, _, state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    model = VAE(cfg.model)
    averaged = load_ema(path) if weights == "ema" else None
    model.load_state_dict(averaged if averaged is not None else model_state)
    return model.eval(), cfg, state, path
