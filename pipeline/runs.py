"""A run's wiring outside the training loop: where its data is, and what its checkpoints hold
as a ready model (for pipeline-eval and pipeline-sample as much as for the trainer)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import latest_checkpoint, load_checkpoint, load_ema
from pipeline.config import Config, config_from_dict
from pipeline.data.builtin import ensure_builtin_dataset
from pipeline.data.loader import make_loader
from pipeline.data.streams import StreamOptions
from pipeline.model import VAE

log = logging.getLogger(__name__)


def resolve_data_urls(cfg: Config) -> tuple[str | list[str], str | list[str]]:
    """(train, held-out) URLs from the config; the embedded dataset when none are given."""
    data = cfg.data
    if not data.train_urls:
        return ensure_builtin_dataset(data.cache_dir or None, seed=data.seed)
    if data.eval_urls:
        return data.train_urls, data.eval_urls
    if isinstance(data.train_urls, str) and data.train_urls.partition("#")[0].endswith("manifest.json"):
        return data.train_urls, data.train_urls.partition("#")[0] + "#heldout"
    log.warning("no data.eval_urls: evaluating on the training shards")
    return data.train_urls, data.train_urls


def heldout_loader(cfg: Config, batch_size: int, urls: str | list[str] | None = None) -> torch.utils.data.DataLoader:
    """The run's held-out shards (or ``urls``) in order, with the run's stream settings."""
    loader, _ = make_loader(urls or resolve_data_urls(cfg)[1], batch_size=batch_size, train=False,
                            channels=cfg.model.channels, options=StreamOptions.from_config(cfg.data))  # fmt: skip
    return loader


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
