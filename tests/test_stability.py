"""The stability machinery: free bits, KL warm-up, soft clamps, EMA, gradient checkpointing,
update skipping and the guard against skipping forever."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.ema import EMA
from pipeline.model import VAE
from pipeline.objective import kl_warmup_weight, negative_elbo, soft_clamp
from tests.conftest import REPO, TINY_MODEL

DIMS = 3 * 32 * 32


def test_free_bits_floor_small_groups_without_gradient_and_leave_the_reported_bound_alone():
    # Group 0 has 2 bits per image, group 1 has 20; with 5 free bits group 0 is not penalised.
    kls = [torch.full((4,), 2 * math.log(2), requires_grad=True), torch.full((4,), 20 * math.log(2), requires_grad=True)]
    recon = torch.full((4,), 1000.0)
    out = negative_elbo(recon, kls, DIMS, free_bits=5.0)
    assert out["loss"].item() == pytest.approx((1000 / math.log(2) + 5 + 20) / DIMS, rel=1e-6)
    assert out["nelbo"].item() == pytest.approx((1000 / math.log(2) + 2 + 20) / DIMS, rel=1e-6)
    out["loss"].backward()
    assert torch.all(kls[0].grad == 0) and torch.all(kls[1].grad > 0)


def test_kl_warmup_weights_the_objective_only():
    assert [kl_warmup_weight(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kl_warmup_weight(0, 0) == 1.0
    kls = [torch.full((2,), 10.0)]
    half = negative_elbo(torch.zeros(2), kls, DIMS, kl_weight=0.5)
    full = negative_elbo(torch.zeros(2), kls, DIMS)
    assert half["loss"].item() == pytest.approx(0.5 * full["loss"].item())
    assert half["nelbo"].item() == pytest.approx(full["nelbo"].item())


def test_soft_clamp_is_the_identity_near_zero_and_bounded():
    x = torch.tensor([-100.0, -5.0, -0.01, 0.0, 0.01, 5.0, 100.0])
    y = soft_clamp(x, 5.0)
    assert torch.all(y.abs() <= 5.0) and y[3] == 0 and y[1].item() == pytest.approx(5 * math.tanh(-1))
    assert y[2].item() == pytest.approx(-0.01, rel=1e-4) and y[4].item() == pytest.approx(0.01, rel=1e-4)
    assert torch.equal(soft_clamp(x, 0.0), x)


def test_ema_warms_up_tracks_and_swaps_back():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.999
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=0)  # keeps 10% of the old average
    assert torch.allclose(ema.state_dict()["weight"], start + 0.9)
    with ema.applied(model):
        assert torch.allclose(model.weight, start + 0.9)
    assert torch.allclose(model.weight, start + 1.0)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = VAE(load_config(None, TINY_MODEL + [f"model.grad_checkpoint={str(flag).lower()}"]).model)
        torch.manual_seed(1)  # the same posterior noise
        images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
        model(images)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


@pytest.mark.slow
def test_skipped_updates_leave_the_weights_alone_and_are_counted(tmp_path, launch):
    run_dir = tmp_path / "skips"
    launch(run_dir, "train.steps=3", "objective.skip_threshold=1e-9", "objective.max_consecutive_skips=100")
    trained = load_file(run_dir / "checkpoints" / "step_000003" / "model.safetensors")
    torch.manual_seed(0)  # what accelerate's set_seed(train.seed=0) does before building the model
    initial = VAE(load_config(REPO / "configs" / "quickstart.yaml", TINY_MODEL).model).state_dict()
    assert all(torch.equal(trained[k], initial[k]) for k in initial)
    from mlflow import MlflowClient

    run_id = json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"]
    metrics = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}").get_run(run_id).data.metrics
    assert metrics["train/skipped_updates"] == 3 and metrics["train/skip_rate"] == 1.0


@pytest.mark.slow
def test_skipping_every_update_stops_with_a_clear_message(tmp_path, launch):
    result = launch(tmp_path / "stall", "train.steps=20", "objective.skip_threshold=1e-9",
                    "objective.max_consecutive_skips=3", expect_failure=True)  # fmt: skip
    assert result.returncode != 0
    assert "training stalled: the last 3 updates were all skipped" in result.stderr
    assert "objective.skip_threshold" in result.stderr


def test_a_collapse_past_the_configured_share_warns_in_the_log_and_in_mlflow(tmp_path, caplog):
    from mlflow import MlflowClient

    from pipeline.tracking import Tracker
    from pipeline.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # only what the collapse watch reads
    trainer.cfg, trainer.step = load_config(None, ["train.collapse_warning_share=0.25"]), 40
    trainer.tracker = Tracker(active=True, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="collapse",
                              run_name="r", run_dir=tmp_path)  # fmt: skip
    trainer._watch_collapse([3], groups=4)  # 1 of 4: at the share, no warning
    assert "collapse" not in caplog.text
    trainer._watch_collapse([0, 2, 3], groups=4)
    trainer.tracker.close("FINISHED")
    assert "step 40: 3 of 4 latent groups collapsed" in caplog.text
    tags = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}").get_run(trainer.tracker.run_id).data.tags
    assert tags["collapse_warning"].startswith("step 40: 3 of 4 latent groups collapsed (no active unit): [0, 2, 3]")


def test_under_bf16_autocast_the_convolutions_run_in_bf16_and_the_distributions_and_likelihood_in_float32(monkeypatch):
    """The README's claim: KL, log-std soft clamp and exp, and the likelihood stay float32."""
    import pipeline.model.vae as vae_module

    seen = {"kl": [], "conv": []}
    real_kl = vae_module.gaussian_kl

    def recording_kl(*tensors):
        seen["kl"] += [t.dtype for t in tensors]
        return real_kl(*tensors)

    monkeypatch.setattr(vae_module, "gaussian_kl", recording_kl)
    model = VAE(load_config(None, TINY_MODEL).model)
    model.bottom_up.stem.register_forward_hook(lambda module, args, out: seen["conv"].append(out.dtype))
    nll = model.likelihood.nll
    recon = []
    model.likelihood.nll = lambda state, x: recon.append(nll(state, x)) or recon[-1]
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert seen["conv"] == [torch.bfloat16]  # autocast is on
    assert seen["kl"] and set(seen["kl"]) == {torch.float32}
    assert recon[0].dtype == torch.float32 and out["loss"].dtype == torch.float32
    assert all(out[k].dtype == torch.float32 for k in ("nelbo", "recon_bpd", "kl_bpd", "kl_bpd_per_group"))
