"""What a run records about itself in MLflow besides its metrics: params without secrets, and tags
saying which code ran where (git commit, processes, precision, Slurm job, hosts, versions).

Params are stored in MLflow for anyone with access to the tracking server to read, forever (they
cannot be changed later), so a secret that reaches them has leaked. Masking happens here, once,
before anything is sent.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

MASK = "***"
SECRET_WORDS = ("key", "token", "secret", "password")
# Spellings that are one word part but still name a credential.
SECRET_COMPOUNDS = ("apikey", "accesskey", "passwd", "authtoken")
# Environment values shorter than this are not searched for in params: a flag such as
# USE_KEY=1 or SECRET_FILE_MODE=true would otherwise mask every "1" or "true" of the config.
MIN_SECRET_LENGTH = 6
# scheme://user:password@host or scheme://token@host: everything between :// and the last @
# before the path is credentials.
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<credentials>[^/@\s'\"]+)@")
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
GIT_TIMEOUT_S = 10
UNKNOWN = "unknown"
# MLflow refuses tag values over 5000 characters (older servers); a thousand hostnames would pass it.
MAX_TAG_CHARS = 5000


def word_parts(name: str) -> list[str]:
    """``"tracking.apiToken"`` -> ``["tracking", "api", "token"]``: split on dots, underscores,
    dashes, spaces and camelCase, lower-cased."""
    return [p.lower() for p in re.split(r"[^A-Za-z0-9]+", _CAMEL_BOUNDARY.sub("_", name)) if p]


def is_secret_name(name: str) -> bool:
    """Whether a config key or environment variable names a secret: one of its word parts is
    key/token/secret/password (or a plural, or a compound like apikey). ``HF_TOKEN``,
    ``data.api_key``, ``AWS_SECRET_ACCESS_KEY`` are; ``checkpoint.keep_last``, ``monkey`` are not."""
    for part in word_parts(name):
        if part in SECRET_COMPOUNDS or part in SECRET_WORDS or part.removesuffix("s") in SECRET_WORDS:
            return True
    return False


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment variables whose names say they hold a secret, longest first
    (so a secret that contains another is masked whole)."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if is_secret_name(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def mask_text(text: str, secrets: list[str]) -> str:
    """``text`` with URL credentials and every occurrence of a secret value replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{MASK}@", text)


def loggable_params(params: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Config params as MLflow may keep them: a key named like a secret has its value replaced by
    ``***`` whatever it holds; any other value (lists as their text) has URL credentials and the
    values of secret environment variables (e.g. a token expanded into a ``pipe:curl -H ...``
    URL) masked where they occur. Values with nothing to mask pass unchanged."""
    secrets = secret_values(environ)
    out: dict[str, Any] = {}
    for key, value in params.items():
        if is_secret_name(key):
            out[key] = MASK if value not in (None, "") else value
            continue
        text = value if isinstance(value, str) else str(value)
        masked = mask_text(text, secrets)
        out[key] = value if masked == text else masked
    return out


def _git(directory: Path, *args: str) -> str | None:
    """``git -C directory args``'s output, or None when git is missing, fails or hangs."""
    try:
        result = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                                timeout=GIT_TIMEOUT_S, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def code_version(package_dir: Path | None = None) -> dict[str, str]:
    """``{"git_commit": sha, "git_dirty": "true"|"false"}`` of the checkout the ``pipeline``
    package is imported from (or ``package_dir``). ``"unknown"`` for both when that directory
    is not a tracked part of a git work tree: installed from a wheel, or into a virtual
    environment that happens to sit inside some repository (its files are not tracked there).
    Dirty: a tracked file differs from the commit (untracked files do not count)."""
    directory = Path(package_dir) if package_dir else Path(__file__).resolve().parent
    unknown = {"git_commit": UNKNOWN, "git_dirty": UNKNOWN}
    if _git(directory, "ls-files", "--error-unmatch", "__init__.py") is None:
        return unknown
    commit = _git(directory, "rev-parse", "HEAD")
    status = _git(directory, "status", "--porcelain", "--untracked-files=no")
    if not commit or status is None:
        return unknown
    return {"git_commit": commit, "git_dirty": str(bool(status)).lower()}


def slurm_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The Slurm job's identity when the run is one: job id, array job and task, restarts (a
    requeued job keeps its id and counts up ``SLURM_RESTART_COUNT``)."""
    environ = os.environ if environ is None else environ
    names = {"slurm_job_id": "SLURM_JOB_ID", "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
             "slurm_array_task_id": "SLURM_ARRAY_TASK_ID", "slurm_restart_count": "SLURM_RESTART_COUNT"}  # fmt: skip
    return {tag: environ[var] for tag, var in names.items() if environ.get(var)}


def gather_hostnames() -> list[str]:
    """Every process's hostname, in rank order. A collective: every rank must call it."""
    from accelerate.utils import gather_object

    return gather_object([socket.gethostname()])


def hostnames_tag(hostnames: list[str]) -> str:
    """Distinct hostnames in rank order, comma-separated, cut to MLflow's tag limit."""
    text = ",".join(dict.fromkeys(hostnames))
    if len(text) > MAX_TAG_CHARS:
        count = len(dict.fromkeys(hostnames))
        suffix = f"... ({count} hosts)"
        text = text[: MAX_TAG_CHARS - len(suffix)] + suffix
    return text


def run_tags(*, world_size: int, precision: str, strategy: str, hostnames: list[str],
             environ: Mapping[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """The tags of a run's start. A resumed run sets them again: they describe its latest start."""
    tags = {
        "world_size": str(world_size),
        "num_processes": str(world_size),  # the name runs logged before world_size was added use
        "mixed_precision": precision,
        "strategy": strategy,
        "hostnames": hostnames_tag(hostnames),
        "num_hosts": str(len(set(hostnames))),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "none",
        "python_version": sys.version.split()[0],
    }
    return tags | code_version() | slurm_tags(environ)
