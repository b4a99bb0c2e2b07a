"""A freshly built model on real images: every latent group starts at its prior (KL ~0) and the
decoder starts out saying next to nothing about the pixels (VDVAE's initialisation, DESIGN.md
"The model"). Random conv biases broke this: 0.36 to 0.47 bits/dim of KL at step 0 for the
quickstart, 1.6 to 2.1 for Fashion-MNIST 28, up to 0.68 in a single group."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.loader import make_loader
from pipeline.data.shards import write_shards
from pipeline.data.sources import read_idx, read_idx_array
from pipeline.model import VAE
from pipeline.runs import resolve_input_statistics
from tests.conftest import FASHION_MNIST, REPO

KL_TOTAL_BOUND = 0.01  # bits/dim, all groups together (measured: 0.0002 to 0.0016)
KL_GROUP_BOUND = 0.003  # bits/dim, any one group (measured: at most 0.0004)
RECON_SLACK = 0.25  # bits/dim around the code length of the zero-output head (measured: < 0.1)


@pytest.fixture(scope="module")
def fashion_train_urls(tmp_path_factory) -> str:
    """The first 2,000 Fashion-MNIST training images as shards, for their manifest statistics."""
    out = tmp_path_factory.mktemp("fashion-init")
    samples = itertools.islice(read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz"), 2000)
    write_shards(out, samples, samples_per_shard=1000)
    return f"{out}/manifest.json#train"


def quickstart_case(builtin_urls, fashion_train_urls):
    loader, _ = make_loader(builtin_urls[1], batch_size=64, train=False, channels=3)  # held-out crops
    return "quickstart.yaml", builtin_urls[0], next(iter(loader))["image"]


def fashion_case(builtin_urls, fashion_train_urls):
    test_images = read_idx_array(FASHION_MNIST / "t10k-images-idx3-ubyte.gz")[:64]
    return "fashion_mnist_28.yaml", fashion_train_urls, torch.from_numpy(np.array(test_images)).unsqueeze(1)


@pytest.mark.parametrize("case", [quickstart_case, fashion_case], ids=["quickstart", "fashion_mnist_28"])
def test_a_fresh_model_starts_every_group_at_its_prior_on_real_images(case, builtin_urls, fashion_train_urls):
    name, train_urls, images = case(builtin_urls, fashion_train_urls)
    cfg = resolve_input_statistics(load_config(REPO / "configs" / name), train_urls)
    assert cfg.model.standardize_input and cfg.model.input_mean  # the manifest's statistics are in use
    x = images.float() / 127.5 - 1
    dims_ln2 = x[0].numel() * math.log(2)
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        model = VAE(cfg.model).eval()
        with torch.no_grad():
            out = model(images)
            state, _ = model.top_down(model.bottom_up(x), x.shape[0])
            # The likelihood head with a zero input outputs its bias, zero: every sub-pixel a
            # logistic of mean 0 and scale 1 (a mixture of identical ones). Its code length is
            # fixed by the images alone, between -log2 of the largest bin's mass (an end value,
            # sigmoid(-1 + 1/255) = 0.27: 1.89 bits) and of the smallest (next to +-1: 9.34 bits);
            # 8 bits would be uniform over the 256 values.
            zero_head = (model.likelihood.nll(torch.zeros_like(state), x).mean() / dims_ln2).item()
        kl, per_group, recon = out["kl_bpd"].item(), out["kl_bpd_per_group"], out["recon_bpd"].item()
        assert kl < KL_TOTAL_BOUND, f"{name}, seed {seed}: KL {kl:.4f} bits/dim at init"
        assert per_group.max().item() < KL_GROUP_BOUND, f"{name}, seed {seed}: KL per group {per_group.tolist()}"
        assert 1.89 < zero_head < 9.34
        # At init the final state carries little (every z ~ its prior, residual branches scaled
        # down, the head's weights small), so the reconstruction term is close to that
        # data-blind code length: the decoder has not yet learned anything, nor been handed a
        # random preference by its biases.
        assert abs(recon - zero_head) < RECON_SLACK, f"{name}, seed {seed}: recon {recon:.3f} vs {zero_head:.3f}"


def test_the_encoder_input_is_standardised_with_the_training_statistics(builtin_urls):
    """(x - mean) / std per channel: on the training crops, mean ~0 and std ~1 per channel
    (the [-1, 1] scaling gave the photo crops' channels std 0.47 to 0.59)."""
    cfg = resolve_input_statistics(load_config(REPO / "configs" / "quickstart.yaml"), builtin_urls[0])
    bottom_up = VAE(cfg.model).bottom_up
    loader, _ = make_loader(builtin_urls[0], batch_size=512, train=False, channels=3)
    images = torch.cat([batch["image"] for batch in loader])
    standardised = images.float() / 127.5 - 1
    standardised = standardised * bottom_up.input_scale + bottom_up.input_shift
    per_channel = standardised.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(1).abs().max() < 1e-4
    assert (per_channel.std(1) - 1).abs().max() < 1e-4
