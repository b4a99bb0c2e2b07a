"""What a run records about itself: params with secrets masked, and tags (git, Slurm, hosts)."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.run_info import MASK, code_version, hostnames_tag, is_secret_name, loggable_params, slurm_tags
from tests.conftest import REPO, free_port
from tests.conftest import test_environment as environment_without_tracking_uri

TOKEN = "hvae-test-9f8e7d6c5b4a"


def test_keys_named_like_secrets_have_their_value_masked():
    params = {"data.api_key": "abc", "tracking.access_token": "xyz", "x.AWS_SECRET_ACCESS_KEY": "k",
              "x.dbPassword": "pw", "x.tokens": ["a", "b"], "x.apikey": "q", "x.empty_token": "",
              "train.steps": 4, "checkpoint.keep_last": 3, "x.monkey": "banana", "x.keyframes": "k1"}  # fmt: skip
    masked = loggable_params(params, environ={})
    for key in ("data.api_key", "tracking.access_token", "x.AWS_SECRET_ACCESS_KEY", "x.dbPassword", "x.tokens",
                "x.apikey"):  # fmt: skip
        assert masked[key] == MASK, key
    # Nothing there to hide; other keys pass untouched, with their types.
    assert masked["x.empty_token"] == ""
    assert masked["train.steps"] == 4 and masked["checkpoint.keep_last"] == 3
    assert masked["x.monkey"] == "banana" and masked["x.keyframes"] == "k1"
    assert is_secret_name("HF_TOKEN") and is_secret_name("MLFLOW_TRACKING_PASSWORD")
    assert not is_secret_name("SLURM_JOB_ID") and not is_secret_name("data.train_urls")


def test_secret_environment_values_and_url_credentials_are_masked_where_they_occur():
    environ = {"HVAE_TEST_TOKEN": TOKEN, "USE_KEY": "1", "HOME": "/root/home-dir"}
    params = {
        "data.train_urls": f"pipe:curl -s -H 'Authorization: Bearer {TOKEN}' https://host/train-{{0..9}}.tar",
        "data.eval_urls": [f"https://host/x.tar?sig={TOKEN}", "https://plain/y.tar"],
        "tracking.tracking_uri": "https://alice:hunter2@mlflow.example.com:5000/",
        "data.cache_dir": "http://only-a-token@host/path",
        "train.steps": 1,
        "train.run_dir": "/root/home-dir/runs/a",
    }
    masked = loggable_params(params, environ=environ)
    assert masked["data.train_urls"] == "pipe:curl -s -H 'Authorization: Bearer ***' https://host/train-{0..9}.tar"
    assert masked["data.eval_urls"] == "['https://host/x.tar?sig=***', 'https://plain/y.tar']"
    assert masked["tracking.tracking_uri"] == "https://***@mlflow.example.com:5000/"
    assert masked["data.cache_dir"] == "http://***@host/path"
    # A short value ("1") is no credential and would mask every 1; HOME is not named like a secret.
    assert masked["train.steps"] == 1 and masked["train.run_dir"] == "/root/home-dir/runs/a"
    assert all(TOKEN not in str(v) and "hunter2" not in str(v) for v in masked.values())


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_git_tags_of_the_running_checkout():
    import pipeline

    package = Path(pipeline.__file__).resolve().parent
    version = code_version()
    assert version["git_commit"] == _git(package, "rev-parse", "HEAD")
    assert version["git_dirty"] in ("true", "false")


def test_git_dirty_flag_and_unknown_outside_a_work_tree(tmp_path):
    repo = tmp_path / "checkout"
    package = repo / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = _git(repo, "rev-parse", "HEAD")
    assert code_version(package) == {"git_commit": head, "git_dirty": "false"}
    (package / "new_module.py").write_text("")  # untracked: not a change of the committed code
    assert code_version(package)["git_dirty"] == "false"
    (package / "__init__.py").write_text("x = 2\n")
    assert code_version(package) == {"git_commit": head, "git_dirty": "true"}

    # Installed from a wheel (no repository), or into an ignored folder of some repository.
    wheel = tmp_path / "site-packages" / "pkg"
    shutil.copytree(package, wheel)
    assert code_version(wheel) == {"git_commit": "unknown", "git_dirty": "unknown"}
    (repo / ".gitignore").write_text("venv/\n")
    shutil.copytree(package, repo / "venv" / "pkg")
    assert code_version(repo / "venv" / "pkg") == {"git_commit": "unknown", "git_dirty": "unknown"}


def test_slurm_tags_come_from_the_job_environment():
    environ = {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2",
               "SLURM_RESTART_COUNT": "1", "SLURM_NTASKS": "8"}  # fmt: skip
    assert slurm_tags(environ) == {"slurm_job_id": "4242", "slurm_array_job_id": "4240", "slurm_array_task_id": "2",
                                   "slurm_restart_count": "1"}  # fmt: skip
    assert slurm_tags({"SLURM_JOB_ID": "7"}) == {"slurm_job_id": "7"}
    assert slurm_tags({}) == {}


def test_hostnames_tag_is_distinct_in_rank_order_and_fits_mlflow():
    assert hostnames_tag(["b", "a", "b", "c"]) == "b,a,c"
    many = [f"node-{i:05d}.cluster.example.com" for i in range(1000)]
    tag = hostnames_tag(many)
    assert len(tag) <= 5000 and tag.endswith("... (1000 hosts)") and tag.startswith("node-00000")


@pytest.mark.slow
def test_hostnames_are_gathered_from_every_rank(tmp_path):
    """Two real processes under `accelerate launch` (gloo): each rank's hostname reaches all."""
    script = tmp_path / "gather.py"
    # Both ranks run on this one machine: each names itself after its rank, so the test sees
    # that the list holds every rank's own answer, in rank order.
    script.write_text(textwrap.dedent("""
        import json, os, socket, sys
        from accelerate import PartialState
        state = PartialState(cpu=True)  # gloo, as pipeline.distributed makes it without a GPU
        socket.gethostname = lambda: f"host-{state.process_index}"
        from pipeline.run_info import gather_hostnames
        # A file per rank: the two processes share one stdout, where their lines can interleave.
        with open(os.path.join(sys.argv[1], f"hosts-{state.process_index}.json"), "w") as out:
            json.dump(gather_hostnames(), out)
        # Leave gloo together: a rank that exits while its peer still holds the group aborts in C++
        # ("terminate called without an active exception"), as train.py's end_training avoids.
        state.wait_for_everyone()
        state.destroy_process_group()
    """))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "cpu_ddp.yaml"), "--num_processes", "2",
               "--main_process_port", str(free_port()), str(script), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env=environment_without_tracking_uri({"PYTHONPATH": str(REPO)}))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    gathered = [json.loads((tmp_path / f"hosts-{rank}.json").read_text()) for rank in (0, 1)]
    assert gathered == [["host-0", "host-1"]] * 2
