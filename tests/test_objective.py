import math

import pytest
import torch

from pipeline.model.likelihood import discretized_logistic_log_prob
from pipeline.objective import gaussian_kl, nats_to_bits_per_dim, negative_elbo


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def test_kl_of_identical_gaussians_is_zero():
    mean, log_std = torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5)
    assert torch.allclose(gaussian_kl(mean, log_std, mean, log_std), torch.zeros(()), atol=1e-6)


def test_kl_matches_the_closed_form():
    # KL(N(1, 2^2) || N(0, 1)) = log(1/2) + (4 + 1)/2 - 1/2 = 2 - log 2
    kl = gaussian_kl(torch.tensor(1.0), torch.tensor(math.log(2.0)), torch.tensor(0.0), torch.tensor(0.0))
    assert kl.item() == pytest.approx(2.0 - math.log(2.0), rel=1e-6)


def test_bits_per_dim_of_one_subpixel_matches_a_hand_calculation():
    # Pixel value 128 -> x = 128/127.5 - 1; a logistic with mean 0 and scale 1 puts mass
    # sigmoid(x + 1/255) - sigmoid(x - 1/255) on its bin; its code length in bits is -log2 of that.
    x = 128 / 127.5 - 1
    p = _sigmoid(x + 1 / 255) - _sigmoid(x - 1 / 255)
    log_prob = discretized_logistic_log_prob(torch.tensor([x]), torch.tensor([0.0]), torch.tensor([0.0]))
    bits = nats_to_bits_per_dim(-log_prob.sum(), dims=1)
    assert bits.item() == pytest.approx(-math.log2(p), rel=1e-5)
    # The bin is 2/255 wide and the density at 0 is 1/4, so p ~ 1/510: about log2(510) = 8.994 bits.
    assert bits.item() == pytest.approx(math.log2(510), abs=1e-3)


def test_edge_bins_take_the_tails():
    # Value 0 owns everything below its upper edge; value 255 everything above its lower edge.
    low = discretized_logistic_log_prob(torch.tensor([-1.0]), torch.tensor([0.3]), torch.tensor([-1.0]))
    high = discretized_logistic_log_prob(torch.tensor([1.0]), torch.tensor([0.3]), torch.tensor([-1.0]))
    scale = math.exp(-1.0)
    assert low.exp().item() == pytest.approx(_sigmoid((-1 + 1 / 255 - 0.3) / scale), rel=1e-5)
    assert high.exp().item() == pytest.approx(1 - _sigmoid((1 - 1 / 255 - 0.3) / scale), rel=1e-5)


@pytest.mark.parametrize("mean, log_scale", [(0.0, 0.0), (0.7, -3.0), (-0.99, -6.5), (0.2, 1.5)])
def test_the_256_bins_form_a_distribution(mean, log_scale):
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    probs = discretized_logistic_log_prob(values, torch.full_like(values, mean), torch.full_like(values, log_scale)).exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-4)


def test_negative_elbo_divides_nats_by_subpixels_and_ln2():
    dims = 3 * 32 * 32
    recon = torch.full((2,), 3.0 * dims * math.log(2))  # 3 bits per sub-pixel
    kls = [torch.full((2,), 0.5 * dims * math.log(2)), torch.full((2,), 0.25 * dims * math.log(2))]
    out = negative_elbo(recon, kls, dims)
    assert out["recon_bpd"].item() == pytest.approx(3.0)
    assert out["kl_bpd_per_group"].tolist() == pytest.approx([0.5, 0.25])
    assert out["kl_bpd"].item() == pytest.approx(0.75)
    assert out["loss"].item() == pytest.approx(3.75)
