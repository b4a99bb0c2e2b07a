"""Real training processes through `accelerate launch`: checkpoints, resume, MLflow, export."""

import json

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from pipeline import Encoder
from pipeline.checkpoint import list_checkpoints, load_checkpoint, load_ema
from pipeline.config import config_from_dict
from pipeline.model import VAE

pytestmark = pytest.mark.slow

# The resume tests extend a 4-step run to 6 steps; a cosine schedule would stretch with the new
# total, and the comparison with 6 uninterrupted steps needs the same learning rates.
CONSTANT_LR = ("optim.schedule=constant",)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, launch):
    run_dir = tmp_path_factory.mktemp("runs") / "first"
    result = launch(run_dir, "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=2", *CONSTANT_LR)
    return run_dir, result


@pytest.fixture(scope="module")
def resumed_run(first_run, launch):
    run_dir, _ = first_run
    # Snapshot what the first run left, before the resume adds to it.
    before = {
        "checkpoints": [p.name for p in list_checkpoints(run_dir / "checkpoints")],
        "summary": json.loads((run_dir / "summary.json").read_text()),
    }
    result = launch(run_dir, "train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=2", *CONSTANT_LR)
    return run_dir, result, before


def _client(run_dir):
    return MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")


def test_a_run_leaves_complete_checkpoints(resumed_run):
    run_dir, _, before = resumed_run
    assert before["checkpoints"] == ["step_000002", "step_000004"]
    model_state, optimizer_state, state = load_checkpoint(run_dir / "checkpoints" / "step_000004")
    assert state["step"] == 4 and state["world_size"] == 1
    assert state["data"][0]["batches_in_epoch"] == 4 and "torch" in state["rng"][0]
    assert config_from_dict(state["config"]).train.steps == 4
    model = VAE(config_from_dict(state["config"]).model)
    model.load_state_dict(model_state)  # strict: every key fits
    # The optimizer state is keyed by parameter name (any strategy can resume it), every parameter's.
    assert optimizer_state.step == 4
    assert set(optimizer_state.tensors) == {name for name, _ in model.named_parameters()}
    assert all(set(t) == {"exp_avg", "exp_avg_sq"} for t in optimizer_state.tensors.values())
    assert optimizer_state.param_groups[0]["params"] == [name for name, _ in model.named_parameters()]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_running_again_resumes_instead_of_starting_over(resumed_run):
    run_dir, result, before = resumed_run
    assert "resumed from" in result.stderr and "(step 4," in result.stderr
    # keep_last=2: step 2 was pruned once step 6 existed
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_000004", "step_000006"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 6
    assert summary["mlflow_run_id"] == before["summary"]["mlflow_run_id"]  # the same MLflow run goes on
    assert summary["first_eval"] == before["summary"]["first_eval"]


def test_resume_is_exact(resumed_run, tmp_path, launch):
    """Stopping at step 4 and resuming to 6 gives the weights of 6 uninterrupted steps."""
    run_dir, _, _ = resumed_run
    straight = tmp_path / "straight"
    launch(straight, "train.steps=6", "checkpoint.every=100", *CONSTANT_LR)
    resumed = load_file(run_dir / "checkpoints" / "step_000006" / "model.safetensors")
    uninterrupted = load_file(straight / "checkpoints" / "step_000006" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    different = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert not different, f"parameters that differ after resume: {different[:5]}"


def test_mlflow_run_holds_params_metrics_and_artifacts(resumed_run):
    run_dir, _, _ = resumed_run
    client = _client(run_dir)
    run_id = json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "4"  # params of the run's first start
    assert run.data.params["model.width"] == "16"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert all(0 < m.value < 20 for m in history)
    assert (run_dir / "checkpoints" / "step_000006" / "ema.safetensors").exists()
    for name in ("train/grad_norm", "train/images_per_s", "train/kl_bpd", "train/recon_bpd",
                 "train/kl_bpd/group_00", "eval/loss", "eval/kl_bpd/group_06", "data/corrupt", "data/missing",
                 "train/nelbo", "train/kl_weight", "train/skip_rate", "eval_ema/loss", "eval_ema/kl_bpd/group_06"):
        assert client.get_metric_history(run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"images", "encoder"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "encoder")} == {"encoder/encoder.safetensors", "encoder/config.json",
                                                                          "encoder/README.md"}
    assert any(a.path.endswith(".png") for a in client.list_artifacts(run_id, "images"))


def test_training_lowers_the_heldout_bits_per_dim(resumed_run):
    run_dir, _, _ = resumed_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_eval"]["eval/loss"] < summary["first_eval"]["eval/loss"] - 0.2


def test_exported_encoder_loads_in_one_call_and_matches_the_checkpoint(resumed_run, builtin_urls):
    run_dir, _, _ = resumed_run
    encoder = Encoder.from_pretrained(run_dir / "encoder")
    from pipeline.data.loader import make_loader

    images = next(iter(make_loader(builtin_urls[1], batch_size=5, train=False)[0]))["image"]
    latents = encoder.latents(images)
    assert [tuple(z.shape) for z in latents] == [(5, *shape) for shape in encoder.latent_shapes]

    _, _, state = load_checkpoint(run_dir / "checkpoints" / "step_000006")
    vae = VAE(config_from_dict(state["config"]).model)
    vae.load_state_dict(load_ema(run_dir / "checkpoints" / "step_000006"))  # the export holds the EMA weights
    expected = Encoder.from_vae(vae.eval()).latents(images)
    assert all(torch.equal(a, b) for a, b in zip(latents, expected))

    # The model card and config.json say what stands behind the encoder: data, steps,
    # device-hours (over both starts: the first run's checkpoint carried its share), the report.
    document = json.loads((run_dir / "encoder" / "config.json").read_text())
    training = document["training"]
    report = json.loads((run_dir / "eval" / "final" / "report.json").read_text())
    assert training["steps"] == 6 and training["processes"] == 1 and training["report"] == report
    assert training["manifest"].endswith("manifest.json") and training["train_samples"] > 0
    first_start = load_checkpoint(run_dir / "checkpoints" / "step_000004")[2]["device_seconds"]
    assert training["device_hours"] * 3600 > state["device_seconds"] > first_start > 0
    card = (run_dir / "encoder" / "README.md").read_text()
    for text in ("steps: 6", f"samples: {training['train_samples']:,}", training["manifest"],
                 f"| negative ELBO, bits/dim | {report['nelbo_bpd']:.3f} |", "2. posterior collapse", "4. blurriness"):
        assert text in card, (text, card)


def test_plain_python_bf16_and_the_tracking_uri_from_the_environment(tmp_path, launch):
    """`python pipeline/train.py` (no launcher) with bf16 autocast, logging to the MLflow store
    that MLFLOW_TRACKING_URI names rather than the run directory's default."""
    other_store = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    run_dir = tmp_path / "plain"
    launch(run_dir, "train.steps=2", "train.mixed_precision=bf16", "tracking.experiment=from-env",
           plain_python=True, env={"MLFLOW_TRACKING_URI": other_store})  # fmt: skip
    assert not (run_dir / "mlflow.db").exists()
    run_id = json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"]
    run = MlflowClient(tracking_uri=other_store).get_run(run_id)
    assert run.data.tags["mixed_precision"] == "bf16"
    assert run.data.metrics["train/loss"] > 0
    assert (run_dir / "checkpoints" / "step_000002" / "model.safetensors").exists()
