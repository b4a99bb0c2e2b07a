"""Faults tried on purpose (issue #14, "nothing lost, nothing faked, nothing hung"): config values
that used to slip through, damaged checkpoints, an encoder config that does not fit its weights,
and shards whose images do not fit the model. Each one must end in a clear error naming the key
or file, or in a fallback that the log reports, never in a deep traceback or silent damage."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from pipeline.config import Config, ConfigError, load_config
from tests.conftest import REPO

# --- 1. config values that slipped through ------------------------------------------------------


def _float_keys() -> list[str]:
    """Every float field of the schema, found from the schema itself, so a new one is covered."""
    keys = []
    for section, section_type in typing.get_type_hints(Config).items():
        for name, annotation in typing.get_type_hints(section_type).items():
            if annotation is float:
                keys.append(f"{section}.{name}")
    return keys


def test_the_schema_has_the_float_fields_the_issue_names():
    assert {"optim.lr", "optim.grad_clip", "objective.free_bits", "data.http_timeout"} <= set(_float_keys())


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf", "1e999"])
def test_non_finite_floats_are_refused_for_every_float_field(key, value):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={value}"])
    assert key in str(info.value) and "finite" in str(info.value)


def test_non_finite_floats_in_a_list_and_in_a_file_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.input_mean\[1\].*finite"):
        load_config(None, ["model.input_mean=[1, .nan, 2]", "model.input_std=[1, 1, 1]"])
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=r"optim\.lr.*finite"):
        load_config(path)


def test_an_empty_run_dir_is_refused():
    for value in ("", "' '"):
        with pytest.raises(ConfigError, match="train.run_dir"):
            load_config(None, [f"train.run_dir={value}"])


def test_mixed_precision_no_from_the_command_line():
    # YAML 1.1 reads a bare `no` as false; the Literal field takes it back as "no".
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_malformed_yaml_a_directory_and_a_missing_file_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n  seed: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value) and "line" in str(info.value)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=str(binary)):
        load_config(binary)
    with pytest.raises(ConfigError, match="train.steps=\\[1"):
        load_config(None, ["train.steps=[1"])


@pytest.mark.parametrize("what", ["directory", "malformed"])
def test_the_training_command_reports_a_bad_config_file_in_one_line(tmp_path, what):
    if what == "directory":
        path = tmp_path
    else:
        path = tmp_path / "bad.yaml"
        path.write_text("model: {width: 16\n")
    result = subprocess.run([sys.executable, str(REPO / "pipeline" / "train.py"), "--config", str(path),
                             f"train.run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("config error:") and str(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
