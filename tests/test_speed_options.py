"""The speed options (pipeline/speed.py, the EMA's one-call update) change how a step is computed,
not what: each one against the plain eager float32 step, then the defaults in a real run.

"The same" means: bitwise for foreach AdamW (the same arithmetic per element) and for the EMA;
for fused AdamW, the channels-last layout and compilation, float32 rounding: other kernels sum
in another order (convolutions, the fused update's ``lr * ...``), about 1e-6 of the weights per
step here, so weights within 1e-4 + 1e-4 relative and losses within 1e-4 bits/dim after 3 steps.
bf16 autocast (what ``train.mixed_precision=auto`` picks on a CPU with AMX) rounds the
convolutions' inputs to 8 bits of mantissa: its losses stay within 1e-3 bits/dim of float32's
(1.2e-4 measured over 5 steps), and a weight can move by at most AdamW's step, ``lr``, per
update the other way where a gradient near zero changed sign.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError, load_config
from pipeline.ema import EMA
from pipeline.model.vae import VAE
from pipeline.speed import make_optimizer, prepare_model
from tests.conftest import REPO, TINY_MODEL

# Every option off: the step as it was before them.
PLAIN = ["optim.implementation=for_loop", "train.channels_last=false", "train.compile=none"]


def train_steps(*overrides: str, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The trainer's step (forward, backward, clip, AdamW, EMA) ``steps`` times on a tiny model,
    from the same weights, images and noise whatever the options; (losses, weights, EMA)."""
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [*TINY_MODEL, *PLAIN, *overrides])
    torch.manual_seed(0)
    model = prepare_model(VAE(cfg.model), cfg.train)
    ema = EMA(model, decay=0.9)
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    size = (4, 3, cfg.model.resolution, cfg.model.resolution)
    images = torch.randint(0, 256, size, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    bf16 = cfg.train.mixed_precision == "bf16"
    losses = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # the posterior noise
        # Autocast around the forward only, as Accelerate does: the backward follows its dtypes.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, step)
        losses.append(out["loss"].item())
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return losses, weights, {k: v.clone() for k, v in ema.state_dict().items()}


@pytest.fixture(scope="module")
def plain_step():
    return train_steps()


def test_foreach_adamw_updates_bitwise_like_the_for_loop(plain_step):
    losses, weights, averaged = train_steps("optim.implementation=foreach")
    assert losses == plain_step[0]
    assert all(torch.equal(weights[k], plain_step[1][k]) for k in weights)
    assert all(torch.equal(averaged[k], plain_step[2][k]) for k in averaged)


def assert_same_within_rounding(result, reference, option: str) -> None:
    losses, weights, averaged = result
    assert losses == pytest.approx(reference[0], abs=1e-4)
    assert weights.keys() == reference[1].keys()  # compiled or not, checkpoints keep their names
    for name, value in weights.items():
        torch.testing.assert_close(value, reference[1][name], atol=1e-4, rtol=1e-4, msg=f"{option}: {name}")
        torch.testing.assert_close(averaged[name], reference[2][name], atol=1e-4, rtol=1e-4, msg=f"{option}: {name}")


@pytest.mark.parametrize("option", ["optim.implementation=fused", "train.channels_last=true"])
def test_each_option_gives_the_plain_step_within_float_rounding(plain_step, option):
    assert_same_within_rounding(train_steps(option), plain_step, option)


def test_bf16_autocast_gives_the_plain_step_within_bf16_rounding(plain_step):
    losses, weights, _ = train_steps("train.mixed_precision=bf16")
    assert losses != plain_step[0]  # the convolutions did run in bf16
    assert losses == pytest.approx(plain_step[0], abs=1e-3)
    lr, steps = load_config(REPO / "configs" / "quickstart.yaml").optim.lr, len(losses)
    for name, value in weights.items():
        torch.testing.assert_close(value, plain_step[1][name], atol=2 * lr * steps, rtol=0, msg=name)


@pytest.mark.parametrize(
    ("accelerator", "amx", "expected"),
    [(False, True, "bf16"), (False, False, "no"), (True, True, "no")],
)
def test_auto_precision_is_bf16_only_on_a_cpu_with_amx(monkeypatch, accelerator, amx, expected):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: accelerator)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cfg = load_config(REPO / "configs" / "cifar10.yaml")
    assert cfg.train.mixed_precision == expected
    assert load_config(None, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"  # as written


# Inductor compiles C++ for every graph: minutes for the tiny model on a busy 2-core machine, so
# compilation is checked on the smallest model that has every part (two resolutions, a merge).
SMALLEST = ["model.resolution=8", "model.width=8", "model.latent_channels=2", "model.encoder_blocks=8x1,8d2,4x1",
            "model.decoder_blocks=4x1,8m4", "train.channels_last=true"]


# Cold, the two cost about 45 s (model) and 60 s (cells) of C++ compilation on the 2-core
# machine: the suite checks the whole model's compilation, the cells' when asked
# (HVAE_TEST_COMPILE_CELLS=1). Both compile through the same nn.Module.compile.
@pytest.mark.slow
@pytest.mark.parametrize(
    "option",
    [pytest.param("train.compile=cells", marks=pytest.mark.skipif(not os.environ.get("HVAE_TEST_COMPILE_CELLS"),
                                                                   reason="HVAE_TEST_COMPILE_CELLS=1 runs it (60 s)")),
     "train.compile=model"],
)  # fmt: skip
def test_compiling_gives_the_plain_step_within_float_rounding(option):
    assert_same_within_rounding(train_steps(*SMALLEST, option), train_steps(*SMALLEST), option)


def test_the_ema_updates_every_tensor_as_one_lerp_each_would():
    torch.manual_seed(0)
    model = VAE(load_config(None, TINY_MODEL).model)
    ema = EMA(model, decay=0.99)
    reference = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    ema.update(model, step=1000)
    for key, value in model.state_dict().items():
        reference[key].lerp_(value.float(), 1 - ema.decay_at(1000))
        assert torch.equal(ema.state_dict()[key], reference[key]), key


def test_channels_last_keeps_the_latent_noise_in_place():
    """randn_like would draw channels-last activations' noise in memory order: other noise, other loss."""
    cfg = load_config(None, TINY_MODEL)
    torch.manual_seed(0)
    model = VAE(cfg.model)
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    losses = []
    for m in (model, fast):
        torch.manual_seed(5)
        with torch.no_grad():
            losses.append(m(images)["kl_bpd_per_group"])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)


def test_compile_mode_without_compile_is_refused():
    with pytest.raises(ConfigError, match="train.compile_mode"):
        load_config(None, ["train.compile_mode=reduce-overhead"])


@pytest.mark.slow
def test_a_real_run_with_the_defaults_trains_what_the_plain_step_trains(tmp_path, launch):
    """Through `accelerate launch` and the trainer: the default options against all of them off,
    the same 3 steps, checkpoints of the same names and (within rounding) the same weights."""
    common = ["train.steps=3", "train.eval_at_start=false", "tracking.enabled=false", "train.final_iw_samples=1"]
    launch(tmp_path / "plain", *common, *PLAIN)
    launch(tmp_path / "defaults", *common)
    plain = load_file(tmp_path / "plain" / "checkpoints" / "step_000003" / "model.safetensors")
    fast = load_file(tmp_path / "defaults" / "checkpoints" / "step_000003" / "model.safetensors")
    assert plain.keys() == fast.keys()
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], atol=1e-4, rtol=1e-4, msg=name)


def test_fused_adamw_resumed_from_a_checkpoint_updates_channels_last_weights_in_place():
    """Checkpoints hold contiguous moments; loaded beside channels-last weights, fused AdamW would
    apply each moment to another element unless the optimizer relays them (make_optimizer)."""
    optim = load_config(None, ["optim.implementation=fused"]).optim
    weights, gradient = torch.randn(8, 6, 3, 3), torch.randn(8, 6, 3, 3)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        parameter = torch.nn.Parameter(weights.clone().contiguous(memory_format=layout))
        first = make_optimizer([parameter], optim)
        parameter.grad = gradient.clone().contiguous(memory_format=layout)
        first.step()
        saved = first.state_dict()
        for moments in saved["state"].values():  # what a checkpoint gives back
            moments.update({k: v.contiguous() for k, v in moments.items() if v.dim() == 4})
        resumed = make_optimizer([parameter], optim)
        resumed.load_state_dict(saved)
        parameter.grad = 0.5 * parameter.grad
        resumed.step()
        results.append(parameter.detach().contiguous())
    torch.testing.assert_close(results[1], results[0], atol=1e-6, rtol=1e-6)
