"""The encoder product: its structured result, the inputs it takes, the exported folder (weights,
config.json, model card), and that loading it needs only the light install (torch, safetensors,
numpy)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from pipeline import Encoder
from pipeline.config import load_config
from pipeline.encoder import LatentGroup
from pipeline.model import VAE
from pipeline.model.likelihood import to_unit_range
from pipeline.model_card import render_model_card
from tests.conftest import REPO, TINY_MODEL

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# What the training stack brings, none of which loading an encoder may import.
HEAVY = ("accelerate", "deepspeed", "transformers", "mlflow", "webdataset", "matplotlib", "skimage", "tqdm",
         "PIL", "yaml", "einops", "pyspng")  # fmt: skip


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    vae = VAE(load_config(None, TINY_MODEL).model).eval()
    # Posterior heads away from their initial state, so means and log-stds differ per image.
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def exported(vae, tmp_path_factory):
    directory = tmp_path_factory.mktemp("encoder") / "encoder"
    Encoder.from_vae(vae).save_pretrained(directory)
    return directory


def _images(n=4, seed=1):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_the_loaded_encoder_returns_the_vae_s_own_posterior_means_exactly(vae, exported):
    images = _images()
    _, groups = vae.top_down(vae.bottom_up(to_unit_range(images)), images.shape[0], use_mean=True)
    encoder = Encoder.from_pretrained(exported)
    latents = encoder(images)
    assert len(latents) == len(groups) == 7 and all(isinstance(g, LatentGroup) for g in latents)
    for i, (got, want) in enumerate(zip(latents, groups)):
        assert got.index == i and got.sample is None
        assert got.shape == encoder.latent_shapes[i] == tuple(want.posterior_mean.shape[1:])
        assert torch.equal(got.mean, want.posterior_mean) and torch.equal(got.log_std, want.posterior_log_std)
    assert [g.resolution for g in latents] == [4, 8, 8, 16, 16, 32, 32]
    # The old return value, kept: one tensor per group.
    assert all(torch.equal(a, g.mean) for a, g in zip(encoder.latents(images), latents))
    assert all(torch.equal(a, g.mean) for a, g in zip(latents.tensors, latents))


def test_sampling_passes_samples_down_and_returns_them_with_their_posteriors(exported):
    encoder = Encoder.from_pretrained(exported)
    images = _images()
    torch.manual_seed(5)
    first = encoder(images, sample=True)
    torch.manual_seed(5)
    again = encoder(images, sample=True)
    means = encoder(images)
    assert all(g.sample is not None and g.sample.shape == g.mean.shape for g in first)
    assert all(torch.equal(a.sample, b.sample) for a, b in zip(first, again))
    assert torch.equal(first[0].mean, means[0].mean)  # the top group sees no sample above it
    assert not torch.equal(first[0].sample, first[0].mean)
    assert not torch.allclose(first[-1].mean, means[-1].mean)  # lower groups see the samples above
    assert all(torch.equal(a, g.sample) for a, g in zip(first.tensors, first))


def test_uint8_float_and_numpy_inputs_and_what_is_refused(exported):
    encoder = Encoder.from_pretrained(exported)
    images = _images()
    reference = encoder(images)
    as_float = images.float() / 127.5 - 1  # the documented float range: [-1, 1]
    for other in (encoder(as_float), encoder(as_float.double()), encoder(images.numpy())):
        assert all(torch.allclose(a.mean, b.mean, atol=1e-5) for a, b in zip(other, reference))
    assert all(torch.equal(a.mean, b.mean) for a, b in zip(encoder(images.numpy()), reference))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        encoder(images.float())  # 0..255 as floats
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        encoder(images[0])
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        encoder(images.permute(0, 2, 3, 1))  # channels last
    with pytest.raises(ValueError, match="uint8"):
        encoder(images.long())


def test_the_export_holds_a_config_that_describes_input_and_latents_and_a_model_card(exported):
    document = json.loads((exported / "config.json").read_text())
    encoder = Encoder.from_pretrained(exported)
    assert document["format_version"] == 1 and document["model"]["width"] == 16
    assert document["input"] == {"resolution": 32, "channels": 3, "bits": 8, "dtypes": {"uint8": [0, 255], "float": [-1.0, 1.0]},
                                 "standardized": False, "input_mean": [127.5] * 3, "input_std": [127.5] * 3}  # fmt: skip
    assert [tuple(g["shape"]) for g in document["latents"]["groups"]] == encoder.latent_shapes
    assert document["parameters"] == sum(p.numel() for p in encoder.parameters())
    assert "training" not in document
    card = (exported / "README.md").read_text()
    assert "| 6 | 32 | (4, 32, 32) |" in card and "Exported outside a training run" in card


def test_the_model_card_quotes_the_run_s_data_steps_device_hours_and_report(exported):
    document = json.loads((exported / "config.json").read_text())
    report = {"step": 40, "weights": "ema", "images": 64, "nelbo_bpd": 4.2345, "recon_bpd": 3.5, "kl_bpd": 0.7341,
              "iw_samples": 8, "iw_bound_bpd": 4.1, "psnr_db": 21.5, "variance_ratio_samples": 0.81,
              "variance_ratio_reconstructions": 0.64, "collapsed_groups": [3],
              "groups": [{"group": 0, "units": 64, "active_units": 12}, {"group": 3, "units": 64, "active_units": 0}],
              "aggregate_posterior_kl": [{"group": 0, "kl_nats": 3.25}]}  # fmt: skip
    document["training"] = {"train_urls": "data/f/manifest.json#train", "manifest": "data/f/manifest.json",
                            "split": "train", "train_samples": 60000, "steps": 40, "batch_size": 8, "processes": 2,
                            "device_type": "cpu", "device_hours": 0.0123, "report": report}  # fmt: skip
    card = render_model_card(document)
    for text in ("`data/f/manifest.json` (split `train`)", "samples: 60,000", "steps: 40", "x 2 processes",
                 "device-hours: 0.0123", "| negative ELBO, bits/dim | 4.234 |", "3.500 / 0.734", "[3]; 12/64, 0/64",
                 "group 0: 3.25", "0.810 / 0.640; 21.50"):  # fmt: skip
        assert text in card, (text, card)
    document["training"]["report"] = None
    assert "No final report" in render_model_card(document)


def test_loading_an_encoder_imports_nothing_of_the_training_stack(exported):
    """In a fresh interpreter: first with the training stack's packages made unimportable (as on
    a `pip install hvae-pipeline` without the train extra), then as installed, checking that none
    of them was imported. torch.hub imports tqdm when it is installed (optional for torch), so
    tqdm is allowed in the second run only if torch alone imports it."""
    script = textwrap.dedent(f"""
        import json, sys
        HEAVY = {HEAVY!r}
        if sys.argv[1] == "blocked":
            # None in sys.modules: `import x` raises ModuleNotFoundError, find_spec says absent.
            sys.modules.update(dict.fromkeys(HEAVY))
        import torch
        by_torch = {{m for m in HEAVY if sys.modules.get(m) is not None}}
        import pipeline.encoder
        from pipeline import Encoder
        encoder = Encoder.from_pretrained({str(exported)!r})
        latents = encoder(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
        imported = sorted(m for m in HEAVY if sys.modules.get(m) is not None and m not in by_torch)
        print(json.dumps({{"shapes": [list(g.shape) for g in latents], "imported": imported,
                          "by_torch": sorted(by_torch)}}))
    """)
    for mode in ("blocked", "installed"):
        result = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 0, (mode, result.stderr[-3000:])
        out = json.loads(result.stdout.strip().splitlines()[-1])
        assert out["imported"] == [], (mode, out)
        assert set(out["by_torch"]) <= {"tqdm"}, (mode, out)
        assert [tuple(s) for s in out["shapes"]] == Encoder.from_pretrained(exported).latent_shapes


def test_the_base_install_is_the_encoder_s_and_the_training_stack_is_an_extra():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = lambda requirements: {canonicalize_name(Requirement(r).name) for r in requirements}  # noqa: E731
    assert names(project["dependencies"]) == {"torch", "safetensors", "numpy"}
    train = names(project["optional-dependencies"]["train"])
    assert {"accelerate", "deepspeed", "transformers", "mlflow", "webdataset", "matplotlib", "scikit-image", "tqdm",
            "pillow", "pyyaml", "einops", "pyspng"} <= train  # fmt: skip
    # The two commands of the README still install everything.
    assert '-e ".[train,dev]"' in (REPO / "Makefile").read_text()
