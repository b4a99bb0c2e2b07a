"""The encoder's input standardisation: statistics from the training manifest into the model
config (``pipeline.runs.resolve_input_statistics``), and through checkpoints and the exported
encoder."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from pipeline import Encoder
from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.data.shards import read_manifest, write_dataset
from pipeline.model import VAE
from pipeline.runs import resolve_input_statistics
from tests.conftest import TINY_MODEL


def images(n: int, channels: int, low: int, high: int, seed: int) -> list[tuple[str, np.ndarray, dict]]:
    rng = np.random.default_rng(seed)
    shape = (32, 32, channels) if channels == 3 else (32, 32)
    return [(f"s{seed}_{i:03d}", rng.integers(low, high, shape, dtype=np.uint8), {}) for i in range(n)]


def stats_of(samples, channels: int) -> tuple[list[float], list[float]]:
    values = np.stack([image for _, image, _ in samples]).astype(np.float64).reshape(-1, channels)
    return values.mean(0).tolist(), values.std(0).tolist()


@pytest.fixture
def dataset(tmp_path):
    train, heldout = images(6, 3, 40, 200, seed=0), images(3, 3, 0, 256, seed=1)
    write_dataset(tmp_path, {"train": iter(train), "heldout": iter(heldout)}, 4, {})
    return tmp_path, train


def tiny(*overrides: str):
    return load_config(None, TINY_MODEL + list(overrides))


def test_statistics_come_from_the_manifest_split_the_training_urls_name(dataset):
    out, train = dataset
    mean, std = stats_of(train, 3)
    for urls in (f"{out}/manifest.json#train", f"{out}/manifest.json", f"{out}/train-{{000000..000001}}.tar",
                 [f"{out}/train-000000.tar", f"{out}/train-000001.tar"]):  # fmt: skip
        model = resolve_input_statistics(tiny(), urls).model
        assert model.input_mean == pytest.approx(mean) and model.input_std == pytest.approx(std), urls
    # The held-out split is not what the model trains on: only named, it is used.
    held = resolve_input_statistics(tiny(), f"{out}/manifest.json#heldout").model
    assert held.input_mean != pytest.approx(mean)


def test_builtin_dataset_patterns_find_their_statistics(builtin_urls):
    cfg = resolve_input_statistics(tiny(), builtin_urls[0])
    assert all(40 < m < 200 for m in cfg.model.input_mean) and all(30 < s < 128 for s in cfg.model.input_std)


def test_several_training_sources_are_pooled_as_one_set(tmp_path):
    first, second = images(5, 3, 0, 100, seed=2), images(3, 3, 100, 256, seed=3)
    write_dataset(tmp_path / "a", {"train": iter(first)}, 4, {})
    write_dataset(tmp_path / "b", {"train": iter(second)}, 4, {})
    urls = [f"{tmp_path}/a/manifest.json#train", f"{tmp_path}/b/train-{{000000..000000}}.tar"]
    model = resolve_input_statistics(tiny(), urls).model
    mean, std = stats_of(first + second, 3)
    assert model.input_mean == pytest.approx(mean) and model.input_std == pytest.approx(std)


def test_grayscale_statistics_are_repeated_for_an_rgb_model(tmp_path):
    gray = images(4, 1, 0, 256, seed=4)
    write_dataset(tmp_path, {"train": iter(gray)}, 4, {})
    mean, std = stats_of(gray, 1)
    model = resolve_input_statistics(tiny(), f"{tmp_path}/manifest.json").model
    assert model.input_mean == pytest.approx(mean * 3) and model.input_std == pytest.approx(std * 3)
    model = resolve_input_statistics(tiny("model.channels=1"), f"{tmp_path}/manifest.json").model
    assert model.input_mean == pytest.approx(mean) and model.input_std == pytest.approx(std)


def test_a_manifest_without_statistics_falls_back_to_the_plain_scaling_with_a_warning(dataset, caplog):
    out, _ = dataset
    manifest = read_manifest(out)
    for entry in manifest["splits"].values():
        del entry["pixel_stats"]  # as written before the shard writer stored them
    (out / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="pipeline.runs"):
        cfg = resolve_input_statistics(tiny(), f"{out}/manifest.json#train")
    assert cfg.model.input_mean == [127.5] * 3 and cfg.model.input_std == [127.5] * 3
    assert "no pixel statistics" in caplog.text
    # ... which is exactly the [-1, 1] input the model had before standardisation existed.
    scale, shift = VAE(cfg.model).bottom_up.input_scale, VAE(cfg.model).bottom_up.input_shift
    assert torch.equal(scale, torch.ones_like(scale)) and not shift.any()


def test_given_or_unwanted_statistics_are_left_alone(dataset):
    out, _ = dataset
    urls = f"{out}/manifest.json#train"
    given = tiny("model.input_mean=[1, 2, 3]", "model.input_std=[4, 5, 6]")
    assert resolve_input_statistics(given, urls) is given
    off = tiny("model.standardize_input=false")
    assert resolve_input_statistics(off, urls) is off
    model = VAE(given.model)  # and the model applies what it is given: (p - mean) / std
    p = torch.tensor([0.0, 127.5, 255.0]).view(1, 3, 1, 1)
    standardised = (p / 127.5 - 1) * model.bottom_up.input_scale + model.bottom_up.input_shift
    assert torch.allclose(standardised.flatten(), torch.tensor([-1 / 4, 125.5 / 5, 252 / 6]))


@pytest.mark.parametrize("overrides", [["model.input_mean=[1, 2]", "model.input_std=[1, 2]"],
                                       ["model.input_mean=[1, 2, 3]"],
                                       ["model.input_mean=[1, 2, 3]", "model.input_std=[1, 0, 1]"]])  # fmt: skip
def test_malformed_statistics_fail_at_start(overrides):
    with pytest.raises(ConfigError, match="model.input_"):
        tiny(*overrides)


def test_statistics_travel_with_the_exported_encoder_and_the_saved_config(dataset, tmp_path):
    out, _ = dataset
    cfg = resolve_input_statistics(tiny(), f"{out}/manifest.json#train")
    torch.manual_seed(0)
    vae = VAE(cfg.model)
    encoder = Encoder.from_vae(vae)
    encoder.save_pretrained(tmp_path / "encoder")
    loaded = Encoder.from_pretrained(tmp_path / "encoder")
    assert loaded.cfg.input_mean == cfg.model.input_mean and loaded.cfg.input_std == cfg.model.input_std
    batch = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert all(torch.equal(a, b) for a, b in zip(loaded.latents(batch), encoder.latents(batch)))
    # The checkpoint's state.json holds cfg.to_dict(); the model rebuilt from it is the same.
    rebuilt = VAE(config_from_dict(json.loads(json.dumps(cfg.to_dict()))).model)
    assert torch.equal(rebuilt.bottom_up.input_scale, vae.bottom_up.input_scale)
    assert torch.equal(rebuilt.bottom_up.input_shift, vae.bottom_up.input_shift)
    # Standardisation changes what the encoder sees: not the same latents as the plain scaling.
    plain = Encoder(tiny("model.standardize_input=false").model)
    plain.load_state_dict(encoder.state_dict())
    assert not torch.allclose(plain(batch)[0].mean, encoder(batch)[0].mean)
