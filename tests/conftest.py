"""Shared fixtures: the embedded dataset written once per session, and a real training launcher."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Real data: ../shared beside the checkout, else Debian's dataset-fashion-mnist package (which
# `make test` installs when ../shared is absent). Missing data fails the tests that need it.
FASHION_MNIST = next(
    (p for p in (REPO.parent / "shared" / "data" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist"))
     if (p / "t10k-images-idx3-ubyte.gz").exists()),
    REPO.parent / "shared" / "data" / "fashion-mnist",
)  # fmt: skip

# A model small enough that a training step takes milliseconds on one CPU core, with the same
# structure as the quickstart's (4 resolutions, one latent group per decoder block).
TINY_MODEL = [
    "model.width=16",
    "model.latent_channels=4",
    "model.encoder_blocks=32x1,32d2,16x1,16d2,8x1,8d2,4x1",
    "model.decoder_blocks=4x1,8m4,8x1,16m8,16x1,32m16,32x1",
]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def builtin_urls(data_cache) -> tuple[str, str]:
    from pipeline.data.builtin import ensure_builtin_dataset

    return ensure_builtin_dataset(data_cache)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    run_dir: Path,
    *overrides: str,
    data_cache: Path,
    num_processes: int = 1,
    accelerate_config: str | None = None,
    launcher_args: tuple[str, ...] = (),
    plain_python: bool = False,
) -> list[str]:
    """``accelerate launch [--config_file configs/accelerate/<name>.yaml] pipeline/train.py ...``
    with the test defaults (tiny model, batch 8, quickstart data) before ``overrides``."""
    if plain_python:
        launcher = [sys.executable]
    elif accelerate_config:
        launcher = [sys.executable, "-m", "accelerate.commands.launch",
                    "--config_file", str(REPO / "configs" / "accelerate" / f"{accelerate_config}.yaml"),
                    "--num_processes", str(num_processes), "--main_process_port", str(free_port()), *launcher_args]
    else:
        launcher = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *launcher_args,
        ]  # fmt: skip
    return [
        *launcher,
        str(REPO / "pipeline" / "train.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
        f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}",
        "data.batch_size=8", "data.num_workers=0", "optim.warmup_steps=1",
        "train.log_every=1", "train.eval_every=1000", "train.image_every=1000", "train.eval_batches=4",
        *TINY_MODEL, *overrides,
    ]  # fmt: skip


def test_environment(env: dict | None = None) -> dict:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | (env or {})


@pytest.fixture(scope="session")
def launch(data_cache):
    """Run ``accelerate launch pipeline/train.py`` as a real process; returns the result."""

    def run(
        run_dir: Path,
        *overrides: str,
        env: dict | None = None,
        expect_failure: bool = False,
        timeout: float = 600,
        **launch_options,
    ) -> subprocess.CompletedProcess:
        command = launch_command(run_dir, *overrides, data_cache=data_cache, **launch_options)
        result = subprocess.run(command, capture_output=True, text=True, env=test_environment(env), cwd=REPO, timeout=timeout)
        if result.returncode != 0 and not expect_failure:
            raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
        return result

    return run
