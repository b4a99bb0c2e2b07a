"""Every likelihood is a distribution over the data's discrete values: masses sum to 1, and
the code lengths match hand computations."""

import itertools
import math

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.model import VAE
from pipeline.model.likelihood import (
    Bernoulli,
    LogisticMixture,
    PerSubpixel,
    discretized_gaussian_log_prob,
    discretized_logistic_log_prob,
    to_uint8,
    to_unit_range,
)
from tests.conftest import TINY_MODEL


def _grid(bits):
    return torch.arange(2**bits, dtype=torch.float64) * (2 / (2**bits - 1)) - 1


@pytest.mark.parametrize("bits", [8, 5])
@pytest.mark.parametrize("log_prob", [discretized_logistic_log_prob, discretized_gaussian_log_prob])
@pytest.mark.parametrize("mean, log_scale", [(0.0, 0.0), (0.6, -3.0), (-0.97, -6.0), (0.1, 1.0)])
def test_per_subpixel_masses_sum_to_one(bits, log_prob, mean, log_scale):
    x = _grid(bits)
    p = log_prob(x, torch.full_like(x, mean), torch.full_like(x, log_scale), 1 / (2**bits - 1)).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=2e-4)


def test_gaussian_bin_mass_matches_a_hand_calculation():
    # 8-bit value 128, N(0, 0.5^2): Phi((x + 1/255) / 0.5) - Phi((x - 1/255) / 0.5)
    x = 128 / 127.5 - 1

    def phi(v):
        return 0.5 * (1 + math.erf(v / math.sqrt(2)))

    expected = phi((x + 1 / 255) / 0.5) - phi((x - 1 / 255) / 0.5)
    got = discretized_gaussian_log_prob(torch.tensor([x], dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                                        torch.tensor([math.log(0.5)], dtype=torch.float64)).exp()  # fmt: skip
    assert got.item() == pytest.approx(expected, rel=1e-6)


def _features(channels, width=4, size=1):
    torch.manual_seed(0)
    return torch.randn(1, width, size, size) * 2


def test_rgb_logistic_mixture_sums_to_one_over_every_colour():
    # 5-bit RGB has 32^3 colours: enumerate them all at one pixel. This checks the mixture and
    # the red -> green -> blue conditioning together (a wrong shift would break the sum).
    head = LogisticMixture(width=4, channels=3, bits=5, mixtures=3)
    features = _features(3)
    grid = _grid(5).float()
    colours = torch.tensor(list(itertools.product(grid.tolist(), repeat=3))).view(-1, 3, 1, 1)
    nll = head.nll(features.expand(len(colours), -1, -1, -1), colours)
    assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-3)


def test_grayscale_logistic_mixture_sums_to_one():
    head = LogisticMixture(width=4, channels=1, bits=8, mixtures=10)
    grid = _grid(8).float().view(-1, 1, 1, 1)
    nll = head.nll(_features(1).expand(len(grid), -1, -1, -1), grid)
    assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-3)


def test_one_component_without_coupling_is_the_per_subpixel_logistic():
    mixture = LogisticMixture(width=4, channels=3, bits=8, mixtures=1)
    single = PerSubpixel(width=4, channels=3, bits=8, family="logistic")
    with torch.no_grad():
        w = mixture.proj.weight
        # Layout: [logit, 3 means, 3 log-scales, 3 coefficients]; zero coefficients decouple RGB.
        single.proj.weight.copy_(torch.cat([w[1:4], w[4:7]]))
        single.proj.bias.copy_(torch.cat([mixture.proj.bias[1:4], mixture.proj.bias[4:7]]))
        mixture.proj.weight[7:].zero_()
        mixture.proj.bias[7:].zero_()
    features = _features(3, size=5)
    x = to_unit_range(torch.randint(0, 256, (1, 3, 5, 5), dtype=torch.uint8))
    assert torch.allclose(mixture.nll(features, x), single.nll(features, x), rtol=1e-5)


def test_bernoulli_code_length_by_hand():
    head = Bernoulli(width=1, channels=1)
    with torch.no_grad():
        head.proj.weight.fill_(1.0)
        head.proj.bias.zero_()
    features = torch.tensor([[[[0.0, math.log(3)]]]])  # logits 0 and log 3: p(1) = 1/2 and 3/4
    x = torch.tensor([[[[1.0, -1.0]]]])  # pixel values 1 and 0
    nats = head.nll(features, x)
    assert nats.item() == pytest.approx(math.log(2) + math.log(4), rel=1e-6)  # -log(1/2) - log(1/4)


def test_n_bit_quantisation_and_display():
    images = torch.tensor([0, 7, 8, 255], dtype=torch.uint8)
    assert to_unit_range(images, 5).tolist() == pytest.approx([-1.0, -1.0, -1 + 2 / 31, 1.0])
    assert to_unit_range(images, 1).tolist() == [-1.0, -1.0, -1.0, 1.0]
    assert to_uint8(to_unit_range(images, 5), 5).tolist() == [0, 0, 8, 255]


@pytest.mark.parametrize("likelihood, bits", [("logistic_mixture", 8), ("logistic_mixture", 5),
                                              ("discretized_gaussian", 8), ("bernoulli", 1)])  # fmt: skip
@pytest.mark.parametrize("channels", [1, 3])
def test_vae_trains_with_every_likelihood(likelihood, bits, channels):
    cfg = load_config(None, TINY_MODEL + [f"model.likelihood={likelihood}", f"model.data_bits={bits}",
                                          f"model.channels={channels}"]).model  # fmt: skip
    torch.manual_seed(0)
    model = VAE(cfg)
    images = torch.randint(0, 256, (2, channels, 32, 32), dtype=torch.uint8)
    out = model(images)
    assert torch.isfinite(out["loss"]) and out["recon_bpd"].item() > 0
    if likelihood == "bernoulli":
        assert out["recon_bpd"].item() < 1.5  # at most about 1 bit per binary sub-pixel at init
    out["loss"].backward()
    assert model.sample(2).shape == (2, channels, 32, 32)


def test_bernoulli_needs_one_bit_data():
    with pytest.raises(ConfigError, match="data_bits"):
        load_config(None, ["model.likelihood=bernoulli"])
    with pytest.raises(ConfigError, match="data_bits"):
        load_config(None, ["model.data_bits=1"])
