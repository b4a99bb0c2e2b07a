"""Shared fixtures: the embedded dataset written once per session, and a real training launcher."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def launch(data_cache):
    """Run ``accelerate launch pipeline/train.py`` as a real process; returns the result."""

    def run(
        run_dir: Path,
        *overrides: str,
        num_processes: int = 1,
        plain_python: bool = False,
        env: dict | None = None,
        expect_failure: bool = False,
    ) -> subprocess.CompletedProcess:
        launcher = [sys.executable] if plain_python else [
            sys.executable, "-m", "accelerate.commands.launch",
            "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
        ]  # fmt: skip
        command = [
            *launcher,
            str(REPO / "pipeline" / "train.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
            f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}",
            "data.batch_size=8", "data.num_workers=0", "optim.warmup_steps=1",
            "train.log_every=1", "train.eval_every=1000", "train.image_every=1000", "train.eval_batches=4",
            *TINY_MODEL, *overrides,
        ]  # fmt: skip
        environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | (env or {})
        result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO, timeout=600)
        if result.returncode != 0 and not expect_failure:
            raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-6000:]}")
        return result

    return run
