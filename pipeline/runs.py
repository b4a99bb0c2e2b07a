"""A run's wiring outside the training loop: where its data is, whether it fits the model, which
checkpoint to start from, and what its checkpoints hold as a ready model (for pipeline-eval and
pipeline-sample as much as for the trainer)."""

from __future__ import annotations

import dataclasses
import logging
import urllib.error
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import webdataset as wds

from pipeline.checkpoint import (
    STATE_FILE,
    CheckpointError,
    load_checkpoint,
    load_ema,
    newest_valid_checkpoint,
    verify_checkpoint,
)
from pipeline.config import Config, config_from_dict
from pipeline.data.builtin import ensure_builtin_dataset
from pipeline.data.loader import make_loader
from pipeline.data.shards import MANIFEST_NAME, pooled_pixel_statistics
from pipeline.data.streams import DataError, StreamOptions, read_json
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


def resolve_input_statistics(cfg: Config, train_urls: str | list[str]) -> Config:
    """The config with ``model.input_mean`` / ``model.input_std`` filled in for the encoder's
    input standardisation; ``cfg`` itself when ``model.standardize_input`` is off or both are
    set already (so a resumed run keeps the statistics saved with it).

    They come from the ``pixel_stats`` of the manifest splits ``train_urls`` (as resolved by
    ``resolve_data_urls``) read from: ``manifest.json#split`` names its split; a shard pattern
    the split of the manifest beside the shards that lists them. Several splits are pooled by
    pixel count. Without any (shards written before the shard writer stored them, ``pipe:``
    URLs, no manifest) it warns and uses mean = std = 127.5 per channel, the plain [-1, 1]
    scaling the model had before standardisation existed.
    """
    model = cfg.model
    if not model.standardize_input or model.input_mean:
        return cfg
    manifests = manifest_splits(train_urls, StreamOptions.from_config(cfg.data))
    splits = {where: entry for where, (_, entry) in manifests.items()}
    with_stats = [entry["pixel_stats"] for entry in splits.values() if "pixel_stats" in entry]
    without = [name for name, entry in splits.items() if "pixel_stats" not in entry]
    if with_stats:
        if without:
            log.warning("no pixel statistics in %s: the input standardisation uses the other training splits'",
                        ", ".join(without))  # fmt: skip
        mean, std = pooled_pixel_statistics(with_stats, model.channels)
        log.info("encoder input standardised with the training pixels' mean %s and std %s",
                 [round(v, 2) for v in mean], [round(v, 2) for v in std])  # fmt: skip
    else:
        log.warning("no pixel statistics in the training shards' manifest (written before pipeline-shards "
                    "stored them, or none found for %s): the encoder's input is scaled to [-1, 1] (mean = std = "
                    "127.5); rewrite the shards or set model.input_mean and model.input_std", train_urls)  # fmt: skip
        mean, std = [127.5] * model.channels, [127.5] * model.channels
    return dataclasses.replace(cfg, model=dataclasses.replace(model, input_mean=mean, input_std=std))


def check_shards_fit_model(cfg: Config, *urls: str | list[str]) -> None:
    """Refuse, at start, shards whose manifest says their images do not fit the model.

    Without this, 28x28 shards into a 32x32 model end in a KeyError deep in the model after the
    start-up work, and grayscale shards into an RGB model train on silently converted images
    (RGB into a grayscale model: silently averaged). The manifests are found as for
    ``resolve_input_statistics``; shards without one, or a manifest without ``image_size`` /
    ``channels``, are not checked. Grayscale into RGB passes when ``data.grayscale_to_rgb`` asks
    for it. Raises DataError naming the manifest, its images and the model's.
    """
    model, options = cfg.model, StreamOptions.from_config(cfg.data)
    checked: set[str] = set()
    for spec in urls:
        for where, (manifest, _) in manifest_splits(spec, options).items():
            url = where.partition("#")[0]
            if url in checked:
                continue
            checked.add(url)
            size, channels = manifest.get("image_size"), manifest.get("channels")
            if size is None or channels is None:
                log.debug("%s records no image size or channels: not checked against the model", url)
                continue
            height, width = (size, size) if isinstance(size, int) else size
            fits_size = height == width == model.resolution
            fits_channels = channels == model.channels or (channels == 1 and cfg.data.grayscale_to_rgb)
            if fits_size and fits_channels:
                continue
            hints = []
            if not fits_size:
                hints.append(f"write shards at {model.resolution}x{model.resolution} (pipeline-shards --resolution "
                             f"{model.resolution}) or set model.resolution and the block strings to fit")  # fmt: skip
            if channels == 1 and model.channels == 3:
                hints.append("set data.grayscale_to_rgb=true to repeat the gray channel, or model.channels=1")
            elif channels == 3 and model.channels == 1:
                hints.append("write grayscale shards (pipeline-shards --channels 1) or set model.channels=3")
            raise DataError(
                f"{url}: its images are {height}x{width} with {_channels(channels)}, the model takes "
                f"{model.resolution}x{model.resolution} with {_channels(model.channels)} "
                f"(model.resolution={model.resolution}, model.channels={model.channels}): " + "; ".join(hints)
            )


def _channels(n: int) -> str:
    return "1 channel (grayscale)" if n == 1 else f"{n} channels (RGB)"


def manifest_splits(urls: str | list[str], options: StreamOptions) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """``{"<manifest url>#<split>": (manifest, split entry)}`` for every manifest split the URLs read."""
    found: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for spec in [urls] if isinstance(urls, str) else urls:
        url, _, split = spec.partition("#")
        if PurePosixPath(url).name == MANIFEST_NAME:
            manifest = _read_manifest(url, options) or {}
            splits = manifest.get("splits", {})
            # As the loader picks it: the named split, else "train", else the only one.
            name = split or ("train" if "train" in splits else next(iter(splits)) if len(splits) == 1 else "")
            if name in splits:
                found[f"{url}#{name}"] = manifest, splits[name]
            continue
        shards_by_dir: dict[str, set[str]] = {}
        for shard in wds.shardlists.expand_urls(spec):
            if not shard.startswith("pipe:"):
                head, _, name = shard.rpartition("/")
                shards_by_dir.setdefault(head + "/" if head else "", set()).add(name)
        for base, names in shards_by_dir.items():
            manifest = _read_manifest(base + MANIFEST_NAME, options) or {}
            for name, entry in manifest.get("splits", {}).items():
                if names & {s["name"] for s in entry["shards"]}:
                    found[f"{base}{MANIFEST_NAME}#{name}"] = manifest, entry
    return found


def _read_manifest(url: str, options: StreamOptions) -> dict[str, Any] | None:
    try:
        return read_json(url, options)
    except (OSError, urllib.error.URLError, ValueError):
        return None  # the loader reports an unreadable manifest; here it only means no statistics


def heldout_loader(cfg: Config, batch_size: int, urls: str | list[str] | None = None) -> torch.utils.data.DataLoader:
    """The run's held-out shards (or ``urls``) in order, with the run's stream settings; DataError
    when their manifest says they do not fit the model (``check_shards_fit_model``)."""
    urls = urls or resolve_data_urls(cfg)[1]
    check_shards_fit_model(cfg, urls)
    loader, _ = make_loader(urls, batch_size=batch_size, train=False,
                            channels=cfg.model.channels, options=StreamOptions.from_config(cfg.data))  # fmt: skip
    return loader


def checkpoint_to_resume(cfg: Config) -> Path | None:
    """The checkpoint a training run starts from: the run directory's newest whole one (damaged
    newer ones are named in the log and skipped), else ``checkpoint.resume_from``, else None.

    ``checkpoint.resume_from`` names one checkpoint on purpose: damaged, it is an error naming the
    file, not a silent fall back to another. So is a run directory whose every checkpoint is
    damaged (CheckpointError either way)."""
    own = newest_valid_checkpoint(Path(cfg.train.run_dir) / "checkpoints")
    if own is not None or not cfg.checkpoint.resume_from:
        return own
    path = Path(cfg.checkpoint.resume_from)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint.resume_from={path}: not a complete checkpoint directory (no {STATE_FILE})")
    try:
        verify_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint.resume_from={path}: {err}") from None
    return path


def load_trained(run_dir: Path, checkpoint: str | None = None, weights: str = "ema") -> tuple[VAE, Config, dict[str, Any], Path]:
    """(model in eval mode, its config, the checkpoint's state.json, the checkpoint path).

    ``checkpoint``: a checkpoint directory or its name under <run_dir>/checkpoints (default: the
    newest that is whole, damaged newer ones named in the log). ``weights``: ``ema`` (the moving
    average, falling back to the live weights for a checkpoint without one) or ``live``. A
    damaged checkpoint named here raises CheckpointError naming the file, as does a run whose
    every checkpoint is damaged.
    """
    root = Path(run_dir) / "checkpoints"
    if checkpoint is None:
        path = newest_valid_checkpoint(root)
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
