"""docker/compose.yaml without a Docker engine (none runs here): the file is checked against the
Compose Specification's JSON schema, and the MLflow server command it runs is run as a real
process, with a real training run logging to it the way the trainer service would."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from tests.conftest import REPO, free_port
from tests.conftest import test_environment as environment_without_tracking_uri
from tests.servers import MlflowServer

COMPOSE = REPO / "docker" / "compose.yaml"


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_validator() -> jsonschema.protocols.Validator:
    # The Compose Specification's own schema (compose-spec/compose-spec, schema/compose-spec.json)
    # as check-jsonschema vendors it (dev extras): nothing is downloaded at test time.
    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)  # the draft its "$schema" names
    validator.check_schema(schema)
    return validator(schema)


def test_compose_file_is_valid_under_the_compose_specification_schema():
    errors = compose_validator().iter_errors(load_compose())
    messages = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    assert not messages, "\n".join(messages)


def test_the_schema_check_rejects_a_misspelt_gpu_reservation_and_an_unknown_condition():
    # The same check on two broken copies: it is not a check that passes anything.
    validator = compose_validator()
    misspelt = load_compose()
    reservations = misspelt["services"]["trainer"]["deploy"]["resources"]["reservations"]
    reservations["device"] = reservations.pop("devices")
    unknown = load_compose()
    unknown["services"]["trainer"]["depends_on"]["mlflow"]["condition"] = "service_ready"
    for broken in (misspelt, unknown):
        assert not validator.is_valid(broken)


def container_port(service: dict) -> int:
    """The container side of the service's one published port ("127.0.0.1:5000:5000")."""
    (published,) = service["ports"]
    return int(str(published).rsplit(":", 1)[1])


def mount_target(service: dict) -> str:
    (volume,) = service["volumes"]
    return volume.split(":")[1]


def test_the_services_are_wired_together():
    compose = load_compose()
    server, trainer = compose["services"]["mlflow"], compose["services"]["trainer"]
    # The server has no login: its port is published on the host's loopback interface only.
    assert [str(p).split(":")[0] for p in server["ports"]] == ["127.0.0.1"]
    assert server["healthcheck"]["test"][0] == "CMD"
    assert trainer["depends_on"]["mlflow"]["condition"] == "service_healthy"
    # The trainer reaches the server by its service name, on the port the server listens on.
    uri = urlsplit(trainer["environment"]["MLFLOW_TRACKING_URI"])
    assert (uri.scheme, uri.hostname, uri.port) == ("http", "mlflow", container_port(server))
    command = server["command"]
    assert command[command.index("--port") + 1] == str(container_port(server))
    # Both stores of the server live on its volume.
    store = mount_target(server)
    assert command[command.index("--backend-store-uri") + 1].startswith(f"sqlite:///{store}/")
    assert command[command.index("--artifacts-destination") + 1].startswith(f"{store}/")
    assert "runs:/runs" in trainer["volumes"]
    assert {"runs", server["volumes"][0].split(":")[0]} <= set(compose["volumes"])
    assert trainer["shm_size"]
    (gpus,) = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and gpus["capabilities"] == ["gpu"]
    # One image, built from docker/Dockerfile with the repository as context; the image makes the
    # mount points (so empty volumes take the non-root user as owner) and the run goes under /runs.
    dockerfile_text = (REPO / "docker" / "Dockerfile").read_text()
    for service in (server, trainer):
        context = COMPOSE.parent / service["build"]["context"]
        assert context.resolve() == REPO
        assert (context / service["build"]["dockerfile"]).resolve() == REPO / "docker" / "Dockerfile"
        assert service["image"] == trainer["image"]
    assert f"mkdir -p /runs {store}" in dockerfile_text and "train.run_dir=/runs/" in dockerfile_text


def here(argv: list[str], port: int, store: Path, compose_port: int, compose_store: str) -> list[str]:
    """A container's argv run on this machine: the venv's programs, the loopback interface, a free
    port and a temporary directory instead of the volume."""
    bin_dir = Path(sys.executable).parent
    programs = {"mlflow": str(bin_dir / "mlflow"), "python": sys.executable}
    out = []
    for arg in argv:
        arg = programs.get(arg, arg)
        arg = "127.0.0.1" if arg == "0.0.0.0" else arg
        # The port to listen on, and in URLs of the loopback interface (the healthcheck's); not in
        # --allowed-hosts, whose "mlflow:5000" is the Host header the trainer sends.
        loopback_url = rf"(?<=//127\.0\.0\.1:){compose_port}\b"
        arg = str(port) if arg == str(compose_port) else re.sub(loopback_url, str(port), arg)
        # The volume's mount point where a path starts ("/mlflow/...", "sqlite:////mlflow/..."), not "mlflow.db".
        out.append(re.sub(rf"(?<![\w.]){re.escape(compose_store)}(?=/|$)", str(store), arg))
    return out


@pytest.fixture(scope="module")
def compose_server(tmp_path_factory):
    """The compose file's MLflow server command, run here; yields (server, store directory)."""
    server = load_compose()["services"]["mlflow"]
    store, port = tmp_path_factory.mktemp("mlflow-store"), free_port()
    argv = here(server["command"], port, store, container_port(server), mount_target(server))
    assert argv[:2] == [str(Path(sys.executable).parent / "mlflow"), "server"] and str(store) in " ".join(argv)
    log = store.parent / f"{store.name}.log"
    with MlflowServer(argv, port, log=log, env=environment_without_tracking_uri()) as running:
        yield running, store


@pytest.mark.slow
def test_the_healthcheck_passes_on_the_server_and_fails_without_one(compose_server):
    running, store = compose_server
    server = load_compose()["services"]["mlflow"]
    _, *check = server["healthcheck"]["test"]  # "CMD", then the argv
    for port, healthy in ((running.port, True), (free_port(), False)):
        argv = here(check, port, store, container_port(server), mount_target(server))
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert (result.returncode == 0) == healthy, result.stderr[-2000:]


@pytest.mark.slow
def test_the_server_accepts_the_trainer_s_host_name_and_refuses_others(compose_server):
    """MLflow refuses unknown Host headers (DNS rebinding). The trainer's requests carry
    "mlflow:5000", which the compose file's --allowed-hosts lets through."""
    running, _ = compose_server
    trainer_host = urlsplit(load_compose()["services"]["trainer"]["environment"]["MLFLOW_TRACKING_URI"]).netloc

    def status(host: str) -> int:
        request = urllib.request.Request(f"{running.url}/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers={"Host": host})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert status(trainer_host) == 200
    assert status(f"127.0.0.1:{running.port}") == 200  # the UI from the host, through the published port
    assert status("attacker.example:5000") == 403


@pytest.mark.slow
def test_a_training_run_logs_its_metrics_and_artifacts_to_the_compose_server(compose_server, tmp_path, launch):
    """`accelerate launch pipeline/train.py` with MLFLOW_TRACKING_URI at the server, as the trainer
    service runs: the run, its metrics and its artifacts are on the server, none in the run dir."""
    from mlflow import MlflowClient

    running, store = compose_server
    run_dir = tmp_path / "run"
    launch(run_dir, "train.steps=3", "tracking.experiment=compose", env={"MLFLOW_TRACKING_URI": running.url})
    run_id = json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"]

    client = MlflowClient(tracking_uri=running.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "compose"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    assert run.data.metrics["train/loss"] > 0 and run.data.params["train.steps"] == "3"
    # Artifacts went up through the server into --artifacts-destination, under the store.
    assert {a.path for a in client.list_artifacts(run_id)} >= {"encoder", "eval"}
    uploaded = [p for p in (store / "artifacts").rglob("*") if p.is_file()]
    assert any(p.name == "encoder.safetensors" for p in uploaded), uploaded
    assert (store / "mlflow.db").exists()
    assert not (run_dir / "mlflow.db").exists() and not (run_dir / "mlartifacts").exists()

