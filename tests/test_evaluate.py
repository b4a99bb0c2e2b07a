"""Evaluation: the diagnostics' arithmetic, the report on a real model, and pipeline-eval."""

import json
import math
import subprocess
import sys

import pytest
import torch

from pipeline.config import load_config
from pipeline.diagnostics import (
    RunningMoments,
    active_units,
    fitted_gaussian,
    gaussian_kl_full_vs_diagonal,
    psnr,
    variance_ratio,
)
from pipeline.evaluate import evaluate, plot_report
from pipeline.model import VAE
from pipeline.objective import gaussian_kl
from tests.conftest import REPO, TINY_MODEL


def test_active_units_count_units_whose_posterior_mean_varies():
    moments = RunningMoments()
    torch.manual_seed(0)
    # unit 0 varies (std 1), unit 1 barely (std 0.05: variance 0.0025 < 0.01), unit 2 is constant
    for _ in range(10):
        moments.add(torch.stack([torch.randn(100), 0.05 * torch.randn(100), torch.full((100,), 3.0)], 1))
    assert active_units(moments) == 1
    assert moments.mean()[2].item() == pytest.approx(3.0)


def test_full_covariance_kl_reduces_to_the_diagonal_formula():
    mean0, var0 = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.3, 2.0, 1.0])
    mean1, var1 = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 0.5, 4.0])
    expected = gaussian_kl(mean0, 0.5 * var0.log(), mean1, 0.5 * var1.log()).sum().item()
    got = gaussian_kl_full_vs_diagonal(mean0.double(), torch.diag(var0).double(), mean1.double(), var1.double())
    assert got == pytest.approx(expected, rel=1e-6)


def test_fitted_gaussian_recovers_a_known_covariance():
    torch.manual_seed(0)
    mix = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    samples = torch.randn(20000, 2) @ mix.T + torch.tensor([1.0, -2.0])
    mean, cov = fitted_gaussian(samples)
    assert torch.allclose(mean, torch.tensor([1.0, -2.0], dtype=torch.float64), atol=0.03)
    assert torch.allclose(cov, (mix @ mix.T).double(), atol=0.05)


def test_variance_ratio_and_psnr_by_hand():
    real, flat = RunningMoments(), RunningMoments()
    real.add(torch.tensor([[0.0, 10.0], [20.0, 30.0]]))  # per-pixel variances 100, 100
    flat.add(torch.tensor([[5.0, 15.0], [15.0, 25.0]]))  # 25, 25
    assert variance_ratio(flat, real) == pytest.approx(0.25)
    a = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    b = torch.full((1, 1, 2, 2), 10, dtype=torch.uint8)  # MSE 100
    assert psnr(a, b).item() == pytest.approx(10 * math.log10(255**2 / 100))


@pytest.fixture(scope="module")
def tiny_model_and_batches():
    torch.manual_seed(0)
    model = VAE(load_config(None, TINY_MODEL).model)
    batches = [{"image": torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)} for _ in range(2)]
    return model, batches


def test_report_on_a_model_whose_posterior_ignores_the_image(tiny_model_and_batches):
    model, batches = tiny_model_and_batches
    torch.manual_seed(1)
    report = evaluate(model, batches, iw_samples=16)
    assert report["images"] == 32 and len(report["groups"]) == model.num_groups
    assert report["nelbo_bpd"] == pytest.approx(report["recon_bpd"] + report["kl_bpd"], rel=1e-6)
    assert report["iw_bound_bpd"] < report["nelbo_bpd"]  # K=16 tightens the bound
    for group in report["groups"]:
        assert 0 <= group["active_units"] <= group["units"]
    # Silence the posterior heads: every group's mean becomes a constant, so all collapse.
    silenced = VAE(model.cfg)
    silenced.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block in silenced.top_down.blocks:
            block.posterior.convs[-1].weight.zero_()
    collapsed = evaluate(silenced, batches)
    assert collapsed["collapsed_groups"] == list(range(model.num_groups))
    assert all(item["kl_nats"] >= 0 for item in collapsed["aggregate_posterior_kl"])


def test_report_figure_is_written(tiny_model_and_batches, tmp_path):
    model, batches = tiny_model_and_batches
    path = plot_report(evaluate(model, batches[:1], iw_samples=2), tmp_path / "figure.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, launch):
    run_dir = tmp_path_factory.mktemp("evaluated") / "run"
    launch(run_dir, "train.steps=3")
    return run_dir


@pytest.mark.slow
def test_pipeline_eval_on_a_trained_run(trained_run):
    run_dir = trained_run
    final = json.loads((run_dir / "eval" / "final" / "report.json").read_text())
    assert final["iw_samples"] == 8 and final["weights"] == "ema"
    assert (run_dir / "eval" / "final" / "figure.png").exists()

    result = subprocess.run([sys.executable, "-m", "pipeline.evaluate", str(run_dir), "--iw-samples", "4",
                             "--max-images", "40"], capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "eval" / "step_000003-ema" / "report.json").read_text())
    assert report["images"] == 40 and report["step"] == 3 and report["iw_samples"] == 4
    assert {"variance_ratio_samples", "variance_ratio_reconstructions", "psnr_db", "collapsed_groups"} <= report.keys()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"]
    metrics = client.get_run(run_id).data.metrics
    assert "test_ema/iw_bound_bpd" in metrics and "final_ema/active_units/group_00" in metrics
    assert "eval_ema/variance_ratio_samples" in metrics and "eval_ema/collapsed_groups" in metrics
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/final", "eval/step_000003-ema"} <= artifacts


@pytest.mark.slow
def test_pipeline_sample_writes_grids_at_temperatures_per_group_and_reconstructions(trained_run, tmp_path):
    from PIL import Image

    def sample(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.sample", str(trained_run), *args],
                              capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip

    result = sample("--temperatures", "1.0,0.5,0.1", "--n", "5", "--out", str(tmp_path / "t.png"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "t.png").size == (5 * 32 * 2, 3 * 32 * 2)  # 3 rows of 5, shown at 2x
    result = sample("--group-temperatures", "1,1,1,0.5,0.5,0,0", "--n", "4", "--out", str(tmp_path / "g.png"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "g.png").size == (4 * 32 * 2, 32 * 2)
    result = sample("--group-temperatures", "1,1", "--n", "4")
    assert result.returncode == 2 and "needs 7 values" in result.stderr
    result = sample("--reconstructions", "--n", "6")
    assert result.returncode == 0, result.stderr
    assert Image.open(result.stdout.strip()).size == (6 * 32 * 2, 2 * 32 * 2)
