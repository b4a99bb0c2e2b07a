import pytest
import torch

from pipeline import Encoder
from pipeline.config import load_config
from pipeline.model import VAE
from tests.conftest import TINY_MODEL


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VAE(load_config(None, TINY_MODEL).model)


def test_forward_returns_the_loss_and_its_parts(vae):
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    out = vae(images)
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert out["kl_bpd_per_group"].shape == (vae.num_groups,) == (7,)
    assert out["loss"].item() == pytest.approx(out["recon_bpd"].item() + out["kl_bpd"].item(), rel=1e-5)
    assert (out["kl_bpd_per_group"] >= 0).all()
    out["loss"].backward()
    no_grad = [n for n, p in vae.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    vae.zero_grad()


def test_features_exist_at_every_resolution(vae):
    features = vae.bottom_up(torch.zeros(2, 3, 32, 32))
    assert {int(r): tuple(f.shape) for r, f in features.items()} == {r: (2, 16, r, r) for r in (32, 16, 8, 4)}


def test_samples_and_reconstructions_are_images(vae):
    assert vae.sample(5).shape == (5, 3, 32, 32)
    assert vae.sample(2, temperature=[1.0, 0.5, 0.5, 0.1, 0.1, 0.0, 0.0]).shape == (2, 3, 32, 32)
    recon = vae.reconstruct(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    assert recon.shape == (4, 3, 32, 32) and recon.min() >= -1 and recon.max() <= 1


def test_encoder_latents_are_the_posterior_means_per_group(vae):
    encoder = Encoder.from_vae(vae)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    latents = encoder.latents(images)
    assert [tuple(z.shape[1:]) for z in latents] == encoder.latent_shapes
    assert [z.shape[-1] for z in latents] == [4, 8, 8, 16, 16, 32, 32]
    assert all(torch.equal(a, b) for a, b in zip(latents, encoder.latents(images)))  # deterministic
    _, groups = vae.top_down(vae.bottom_up(images.float() / 127.5 - 1), 2, use_mean=True)
    assert all(torch.allclose(z, g.posterior_mean) for z, g in zip(latents, groups))


def test_grayscale_model():
    cfg = load_config(None, TINY_MODEL + ["model.channels=1"]).model
    out = VAE(cfg)(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    assert torch.isfinite(out["loss"])


def test_presets_have_the_parameter_counts_the_readme_states():
    import re

    from pipeline.model.vae import count_parameters
    from tests.conftest import REPO

    table = dict(re.findall(r"^\| `configs/(\S+\.yaml)` \| [^|]+\| ([\d,]+) \|", (REPO / "README.md").read_text(), re.M))
    configs = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert sorted(table) == configs
    for name, stated in table.items():
        assert count_parameters(load_config(REPO / "configs" / name).model) == int(stated.replace(",", "")), name
    # VDVAE's reported sizes: CIFAR-10 39M, ImageNet-64 125M, FFHQ-256 115M.
    assert round(int(table["cifar10.yaml"].replace(",", "")) / 1e6) == 39
    assert round(int(table["imagenet64.yaml"].replace(",", "")) / 1e6) == 125
    assert round(int(table["ffhq256_5bit.yaml"].replace(",", "")) / 1e6) == 115


def test_widths_per_resolution():
    cfg = load_config(None, TINY_MODEL + ["model.widths=32:8,16:24"]).model
    torch.manual_seed(0)
    model = VAE(cfg)
    features = model.bottom_up(torch.zeros(2, 3, 32, 32))
    assert {int(r): f.shape[1] for r, f in features.items()} == {32: 8, 16: 24, 8: 16, 4: 16}
    out = model(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.sample(2).shape == (2, 3, 32, 32)


def test_no_learned_state_above_the_limit():
    cfg = load_config(None, TINY_MODEL + ["model.state_bias_max_resolution=8"]).model
    model = VAE(cfg)
    assert sorted(int(r) for r in model.top_down.initial_state) == [4, 8]
    assert torch.isfinite(model(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))["loss"])


def test_vdvae_initialisation_scales_residuals_and_zeroes_the_prior_output():
    from pipeline.model.blocks import ResidualBlock

    torch.manual_seed(3)
    plain = ResidualBlock(8, 2, 8, resolution=8, last_scale=1.0)
    torch.manual_seed(3)
    scaled = ResidualBlock(8, 2, 8, resolution=8, last_scale=0.25)
    assert torch.allclose(scaled.convs[-1].weight, 0.25 * plain.convs[-1].weight)
    assert torch.equal(scaled.convs[0].weight, plain.convs[0].weight)  # only the last conv is scaled

    model = VAE(load_config(None, TINY_MODEL).model)
    for block in model.top_down.blocks:
        assert not block.prior.convs[-1].weight.any() and not block.prior.convs[-1].bias.any()
    # So at initialisation the prior is N(0, 1) for every group: the first group's prior mean is 0.
    _, groups = model.top_down(None, 2)
    assert not groups[0].prior_mean.any() and not groups[0].prior_log_std.any()


@pytest.mark.parametrize("likelihood", ["logistic_mixture", "discretized_logistic", "bernoulli"])
def test_every_conv_bias_is_zero_at_construction(likelihood):
    """PyTorch's default bias (uniform +-1/sqrt(fan_in)) would start each group's posterior at a
    data-blind shift from its prior and put a constant into every residual stream (VDVAE zeroes
    them all). Walks every module, so a conv added later without ``blocks.conv`` fails here."""
    bits = ["model.data_bits=1"] if likelihood == "bernoulli" else []
    cfg = load_config(None, TINY_MODEL + ["model.widths=16:24,8:16", f"model.likelihood={likelihood}", *bits]).model
    model = VAE(cfg)
    convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert any(name.startswith("likelihood.") for name in convs)
    assert any(name.startswith("bottom_up.projections.") for name in convs)  # the 32 -> 16 width change
    assert any(name.startswith("top_down.merge_projections.") for name in convs)
    assert {name: m.bias.abs().max().item() for name, m in convs.items() if m.bias.any()} == {}
    assert all(m.weight.any() for name, m in convs.items() if not name.endswith("prior.convs.3"))


def test_residual_branches_are_scaled_by_the_depth_of_their_pass():
    """VDVAE: the last conv of each encoder block by 1/sqrt(encoder blocks), of each decoder cell
    and each z projection by 1/sqrt(decoder blocks); the posterior head is not scaled.

    Default init draws weights uniform in +-1/sqrt(fan_in) (kaiming_uniform, a=sqrt(5)), so a
    layer scaled by s has every weight within s/sqrt(fan_in), and the largest of its 64 weights
    lies above half that with probability 1 - 2**-64: the scale is pinned from both sides."""
    model = VAE(load_config(None, TINY_MODEL + ["model.encoder_blocks=32x2,32d2,16x1,16d2,8x1,8d2,4x1"]).model)
    encoder_scale, decoder_scale = 1 / 8**0.5, 1 / 7**0.5  # 8 encoder blocks, 7 decoder blocks

    def scaled_by(layer: torch.nn.Conv2d, scale: float) -> bool:
        bound = scale / layer.weight[0].numel() ** 0.5
        return bound / 2 < layer.weight.abs().max().item() <= bound

    assert all(scaled_by(block.convs[-1], encoder_scale) for block in model.bottom_up.blocks)
    for block in model.top_down.blocks:
        assert scaled_by(block.cell.convs[-1], decoder_scale)
        assert scaled_by(block.z_proj, decoder_scale)
        assert scaled_by(block.posterior.convs[-1], 1.0)


def test_final_state_gets_a_learned_gain_and_bias_that_start_as_the_identity(tmp_path):
    torch.manual_seed(0)
    model = VAE(load_config(None, TINY_MODEL).model)
    affine = model.top_down.output_gain_bias
    assert affine.gain.shape == affine.bias.shape == (1, 16, 1, 1)
    assert torch.equal(affine.gain, torch.ones_like(affine.gain)) and not affine.bias.any()

    # A model saved before the gain and bias existed loads, with them at the identity.
    old = {k: v for k, v in model.state_dict().items() if "output_gain_bias" not in k}
    with torch.no_grad():
        affine.gain.mul_(2.0)
    model.load_state_dict(old)
    assert torch.equal(affine.gain, torch.ones_like(affine.gain))
    # ... and so does an encoder exported then.
    encoder = Encoder.from_vae(model)
    encoder.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "encoder.safetensors")
    save_file({k: v for k, v in weights.items() if "output_gain_bias" not in k}, tmp_path / "encoder.safetensors")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    loaded = Encoder.from_pretrained(tmp_path).latents(images)
    assert all(torch.equal(a, b) for a, b in zip(loaded, encoder.latents(images)))
