"""The cost of a run: FLOPs against hand counts, the energy counters this machine has, and a
real training run's summary.json, figure and MLflow metrics."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from pipeline.config import ModelConfig
from pipeline.cost import EnergyMeter, conv_flops_per_image, train_flops_per_image, vae_flops_per_image

TOKEN = "hvae-e2e-0a1b2c3d4e5f"


def test_flops_of_a_small_network_equal_the_hand_count():
    network = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 16x16 out
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2, padding=1),  # 8x8 out
        nn.Conv2d(4, 4, 3, padding=1, groups=2),  # 8x8 out, each output sees 2 input channels
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )
    macs = (
        16 * 16 * 8 * (3 * 3 * 3)  # output elements x (input channels x kernel area)
        + 8 * 8 * 4 * (8 * 3 * 3)
        + 8 * 8 * 4 * (2 * 3 * 3)
        + 10 * 256
    )
    assert macs == 55_296 + 18_432 + 4_608 + 2_560
    rng = torch.random.get_rng_state()
    assert conv_flops_per_image(network, 16, 3) == 2 * macs
    assert torch.equal(torch.random.get_rng_state(), rng)  # counting draws no training noise
    assert train_flops_per_image(2 * macs) == 6 * macs


def _residual_macs(r: int, cin: int, hidden: int, cout: int) -> int:
    """ResidualBlock at r x r: 1x1 in, two 3x3 (1x1 at r <= 2), 1x1 out."""
    k = 3 if r > 2 else 1
    return r * r * (cin * hidden + 2 * hidden * hidden * k * k + hidden * cout)


def test_flops_of_the_tiny_vae_equal_the_hand_count():
    """The tests' tiny model (tests/conftest.py TINY_MODEL), every conv counted by hand."""
    cfg = ModelConfig(width=16, latent_channels=4, mixtures=10, channels=3, resolution=32,
                      encoder_blocks="32x1,32d2,16x1,16d2,8x1,8d2,4x1",
                      decoder_blocks="4x1,8m4,8x1,16m8,16x1,32m16,32x1")  # fmt: skip
    w, h, z = 16, 4, 4  # width, bottleneck (16 x 0.25), latent channels
    stem = 32 * 32 * w * (3 * 3 * 3)
    assert stem == 442_368
    # Encoder: "32x1,32d2" runs two blocks at 32 (the second pools after), and so on down to 4.
    encoder = 2 * _residual_macs(32, w, h, w) + 2 * _residual_macs(16, w, h, w) + 2 * _residual_macs(8, w, h, w) \
        + _residual_macs(4, w, h, w)
    # Each latent group: posterior (state + features -> mean, log-std), prior (-> mean, log-std,
    # state update), the 1x1 z projection, the residual cell. Groups: one at 4, two at 8, 16, 32.
    def group(r: int) -> int:
        return _residual_macs(r, 2 * w, h, 2 * z) + _residual_macs(r, w, h, 2 * z + w) + r * r * z * w \
            + _residual_macs(r, w, h, w)

    decoder = group(4) + 2 * group(8) + 2 * group(16) + 2 * group(32)
    # Logistic mixture head, a 1x1 conv: 10 x (logit + 3 means + 3 log-scales + 3 coefficients).
    head = 32 * 32 * w * 10 * (1 + 3 + 3 + 3)
    assert vae_flops_per_image(cfg) == 2 * (stem + encoder + decoder + head)
    from pipeline.model import VAE

    torch.manual_seed(0)
    stem_only = VAE(cfg).bottom_up.stem  # the same count on a real module, real weights
    assert conv_flops_per_image(stem_only, 32, 3) == 2 * stem


def test_the_energy_meter_reports_this_machine_or_says_why_not():
    meter = EnergyMeter()
    meter.start()
    sum(i * i for i in range(200_000))
    used = meter.joules()
    if meter.available:  # RAPL readable here
        assert meter.source == "rapl" and isinstance(used, float) and used >= 0
    else:
        reason = meter.source.removeprefix("unavailable: ")
        assert meter.source.startswith("unavailable: ") and len(reason) > 10, meter.source
        assert used is None  # never a number without a counter


def _zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def test_rapl_packages_are_summed_across_a_wrap_around(tmp_path):
    """The powercap layout of a two-socket machine, as files: the meter reads it as it would /sys."""
    package0 = _zone(tmp_path, "intel-rapl:0", "package-0", 999_000_000, 1_000_000_000)
    package1 = _zone(tmp_path, "intel-rapl:1", "package-1", 5_000_000, 1_000_000_000)
    core = _zone(tmp_path, "intel-rapl:0:0", "core", 10, 1_000_000_000)  # inside package 0: not added again
    meter = EnergyMeter(powercap_root=tmp_path)
    assert meter.source == "rapl"
    meter.start()
    (package0 / "energy_uj").write_text("1000000\n")  # wrapped: 1 J to the top, 1 J after
    (package1 / "energy_uj").write_text("8000000\n")  # 3 J
    (core / "energy_uj").write_text("900000000\n")
    assert meter.joules() == pytest.approx(5.0)
    (package0 / "energy_uj").write_text("3000000\n")  # 2 J more
    assert meter.joules() == pytest.approx(7.0)
    # Another process of the same machine counts nothing: the packages are the machine's.
    assert EnergyMeter(powercap_root=tmp_path, count_node=False).joules() == 0.0


def test_rapl_without_package_domains_is_unavailable_with_the_reason(tmp_path):
    assert EnergyMeter(powercap_root=tmp_path / "absent").source.endswith("does not exist)")
    _zone(tmp_path, "intel-rapl:0", "psys", 1, 2)
    meter = EnergyMeter(powercap_root=tmp_path)
    assert meter.source.startswith("unavailable: no RAPL package domain") and meter.joules() is None


@pytest.mark.slow
def test_a_run_records_its_cost_without_secrets(tmp_path, launch, builtin_urls):
    """Two starts of a real training run (2 steps, then resumed to 4) through a shard folder whose
    path holds a secret token: the token never reaches MLflow, the cost and the held-out history
    carry across the resume, and summary.json, the figure and the metrics say what it cost."""
    shards = Path(builtin_urls[0]).parent
    # A URL-ish config value holding a secret's value: the shards seen through a link so named.
    secret_dir = tmp_path / f"bucket-{TOKEN}"
    secret_dir.symlink_to(shards)
    urls = [f"data.train_urls={secret_dir / Path(u).name}" for u in builtin_urls[:1]]
    urls += [f"data.eval_urls={secret_dir / Path(builtin_urls[1]).name}"]
    run_dir = tmp_path / "run"
    # Evaluations as cheap as they go (one batch, no diagnostics, no IW bound): their figures do not matter here.
    common = (*urls, "train.eval_every=2", "train.final_iw_samples=0", "train.eval_batches=1", "train.diagnostics=false")
    env = {"HVAE_TEST_TOKEN": TOKEN}
    launch(run_dir, "train.steps=2", *common, env=env, plain_python=True)
    launch(run_dir, "train.steps=4", *common, env=env, plain_python=True)

    summary = json.loads((run_dir / "summary.json").read_text())
    cost = summary["cost"]
    assert {"device_hours", "gpu_hours", "flops_per_image", "train_flops_per_image", "achieved_flops_per_s",
            "energy_j", "energy_source", "train_images", "train_seconds"} <= set(cost)  # fmt: skip
    assert cost["train_images"] == 4 * 8  # both starts' images: 4 steps of batch 8
    assert cost["gpu_hours"] is None and cost["device_hours"] > 0
    assert cost["achieved_flops_per_s"] == pytest.approx(cost["train_flops_per_image"] * 32 / cost["train_seconds"])
    meter = EnergyMeter()
    assert cost["energy_source"] == meter.source
    assert (cost["energy_j"] is None) == (not meter.available)

    # The evaluations of both starts, device-hours growing with the steps: the figure's points.
    history = json.loads((run_dir / "eval" / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 2, 4]
    hours = [h["device_hours"] for h in history]
    assert hours == sorted(hours) and hours[-1] <= cost["device_hours"]
    assert (run_dir / "eval" / "quality_vs_cost.png").stat().st_size > 10_000

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["data.train_urls"].endswith("/bucket-***/" + Path(builtin_urls[0]).name)
    assert not [k for k, v in params.items() if TOKEN in v]
    assert metrics["cost/flops_per_image"] == cost["flops_per_image"]
    assert metrics["cost/device_hours"] == pytest.approx(cost["device_hours"])
    assert ("cost/energy_j" in metrics) == meter.available and "cost/gpu_hours" not in metrics
    waits = client.get_metric_history(run.info.run_id, "train/data_wait_fraction")
    assert sorted(m.step for m in waits) == [1, 2, 3, 4] and all(0 < m.value < 1 for m in waits)
    assert len(client.get_metric_history(run.info.run_id, "cost/achieved_flops_per_s")) >= 4
    import pipeline
    from pipeline.run_info import code_version

    assert tags["git_commit"] == code_version(Path(pipeline.__file__).parent)["git_commit"] != "unknown"
    assert tags["hostnames"] == socket.gethostname() and tags["world_size"] == "1"
    assert tags["strategy"] == "distributedtype.no" and tags["energy_source"] == meter.source
    assert ("slurm_job_id" in tags) == bool(os.environ.get("SLURM_JOB_ID"))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/quality_vs_cost.png", "eval/history.json", "eval/final"} <= artifacts
    assert "summary.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # The exported encoder (an artifact too) names its shards without the token.
    encoder_config = (run_dir / "encoder" / "config.json").read_text()
    assert TOKEN not in encoder_config and "bucket-***" in encoder_config
    assert f"{cost['flops_per_image']:,} FLOPs per image" in (run_dir / "encoder" / "README.md").read_text()
