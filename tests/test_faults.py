"""Faults tried on purpose (issue #14, "nothing lost, nothing faked, nothing hung"): config values
that used to slip through, damaged checkpoints, an encoder config that does not fit its weights,
and shards whose images do not fit the model. Each one must end in a clear error naming the key
or file, or in a fallback that the log reports, never in a deep traceback or silent damage."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import textwrap
import typing

import pytest
import torch
from safetensors.torch import load_file

from pipeline import checkpoint as ckpt
from pipeline import runs
from pipeline.checkpoint import PortableOptimizerState, list_checkpoints, load_checkpoint, load_ema, save_checkpoint
from pipeline.config import Config, ConfigError, load_config
from pipeline.data.shards import main as write_shards
from pipeline.data.streams import DataError
from pipeline.model import VAE
from tests.conftest import FASHION_MNIST, REPO, TINY_MODEL

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


# --- 2 and 3. damaged checkpoints, checksums ----------------------------------------------------


def _tiny_config(data_cache) -> Config:
    return load_config(None, TINY_MODEL + [f"data.cache_dir={data_cache}", "tracking.enabled=false"])


def _save(root, step: int, cfg: Config, seed: int = 0):
    """A checkpoint as the trainer writes one: real VAE weights, EMA, optimizer state, config."""
    torch.manual_seed(seed)
    model = VAE(cfg.model)
    weights = model.state_dict()
    names = [n for n, _ in model.named_parameters()]
    optimizer = PortableOptimizerState({n: {"exp_avg": torch.randn(p.shape), "exp_avg_sq": torch.rand(p.shape)}
                                        for n, p in model.named_parameters()}, step,
                                       [{"lr": 1e-3, "params": names}])  # fmt: skip
    state = {"world_size": 1, "config": cfg.to_dict(), "skipped_updates": 0}
    return save_checkpoint(root, step, weights, optimizer, state, keep_last=5, ema_state=weights)


@pytest.fixture
def checkpoints(tmp_path, data_cache):
    """A run directory with complete checkpoints at steps 1 and 2."""
    cfg = _tiny_config(data_cache)
    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        _save(root, step, cfg, seed=step)
    return root


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte_in_the_middle(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_each_checkpoint_records_the_sha256_of_its_files_written_last(checkpoints):
    newest = checkpoints / "step_000002"
    listed = json.loads((newest / ckpt.CHECKSUMS_FILE).read_text())
    recorded = listed["sha256"]
    files = {p.name for p in newest.iterdir()} - {ckpt.CHECKSUMS_FILE}
    assert set(recorded) == files == {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"}
    for name, digest in recorded.items():
        assert hashlib.sha256((newest / name).read_bytes()).hexdigest() == digest
        assert listed["bytes"][name] == (newest / name).stat().st_size
    ckpt.verify_checkpoint(newest)


def test_a_bit_flip_that_safetensors_still_loads_is_caught_and_the_previous_checkpoint_used(checkpoints, caplog):
    damaged = checkpoints / "step_000002" / "model.safetensors"
    _flip_a_byte_in_the_middle(damaged)
    load_file(damaged)  # the format itself does not notice: only the checksum can
    with pytest.raises(ckpt.CheckpointError, match="step_000002/model.safetensors.*sha256"):
        load_checkpoint(checkpoints / "step_000002")
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert ckpt.newest_valid_checkpoint(checkpoints) == checkpoints / "step_000001"
    assert "step_000002/model.safetensors" in caplog.text and "step_000001" in caplog.text


@pytest.mark.parametrize("damage", ["truncated model", "garbage state.json", "truncated ema", "no optimizer"])
@pytest.mark.parametrize("checksums", [True, False], ids=["checksummed", "older-without-checksums"])
def test_a_damaged_newest_checkpoint_is_named_and_skipped(checkpoints, caplog, damage, checksums):
    newest = checkpoints / "step_000002"
    if not checksums:
        for step in checkpoints.iterdir():
            (step / ckpt.CHECKSUMS_FILE).unlink()
    file = {"truncated model": "model.safetensors", "garbage state.json": "state.json",
            "truncated ema": "ema.safetensors", "no optimizer": "optimizer.safetensors"}[damage]  # fmt: skip
    if damage == "garbage state.json":
        (newest / file).write_text("{not json")
    elif damage == "no optimizer":
        (newest / file).unlink()
    else:
        _truncate(newest / file)
    with pytest.raises(ckpt.CheckpointError, match=f"step_000002/{file}"):
        ckpt.verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert ckpt.newest_valid_checkpoint(checkpoints) == checkpoints / "step_000001"
    assert f"step_000002/{file}" in caplog.text


def test_a_checkpoint_without_checksums_still_loads_with_a_note(checkpoints, caplog):
    older = checkpoints / "step_000002"
    (older / ckpt.CHECKSUMS_FILE).unlink()
    with caplog.at_level(logging.INFO, logger="pipeline.checkpoint"):
        model_state, optimizer_state, state = load_checkpoint(older)
    assert state["step"] == 2 and optimizer_state.step == 2 and model_state
    assert "no checksums" in caplog.text
    assert ckpt.newest_valid_checkpoint(checkpoints) == older


def test_when_every_checkpoint_is_damaged_the_run_stops_instead_of_starting_over(checkpoints):
    for step in checkpoints.iterdir():
        _truncate(step / "model.safetensors")
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.newest_valid_checkpoint(checkpoints)
    assert "step_000001" in str(info.value) and "step_000002" in str(info.value)


def test_saving_over_a_damaged_checkpoint_of_the_same_step_keeps_it_aside(checkpoints, data_cache):
    newest = checkpoints / "step_000002"
    _truncate(newest / "model.safetensors")
    damaged_bytes = (newest / "model.safetensors").read_bytes()
    _save(checkpoints, 2, _tiny_config(data_cache), seed=7)
    ckpt.verify_checkpoint(newest)  # written anew, not "already saved"
    aside = [p for p in checkpoints.iterdir() if p.name.startswith("step_000002.damaged")]
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == damaged_bytes
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_000001", "step_000002"]


def test_load_ema_checks_its_file(checkpoints):
    _flip_a_byte_in_the_middle(checkpoints / "step_000002" / "ema.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="ema.safetensors"):
        load_ema(checkpoints / "step_000002")


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_eval_and_sample_fall_back_past_a_truncated_checkpoint_and_refuse_a_named_one(checkpoints, tmp_path):
    run_dir = checkpoints.parent
    _truncate(checkpoints / "step_000002" / "model.safetensors")
    result = _cli("pipeline.evaluate", str(run_dir), "--iw-samples", "0", "--max-images", "8", "--no-mlflow")
    assert result.returncode == 0, result.stderr
    assert "step_000002/model.safetensors" in result.stderr and "SafetensorError" not in result.stderr
    assert json.loads((run_dir / "eval" / "step_000001-ema" / "report.json").read_text())["step"] == 1
    result = _cli("pipeline.sample", str(run_dir), "--n", "2", "--temperatures", "1.0", "--out", str(tmp_path / "s.png"))
    assert result.returncode == 0, result.stderr
    assert "step_000002/model.safetensors" in result.stderr and (tmp_path / "s.png").exists()
    # Named explicitly, a damaged checkpoint is an error that names the file, not a fallback.
    result = _cli("pipeline.evaluate", str(run_dir), "--checkpoint", "step_000002", "--no-mlflow")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "step_000002/model.safetensors" in result.stderr
    result = _cli("pipeline.sample", str(run_dir), "--checkpoint", str(checkpoints / "step_000002"))
    assert result.returncode == 2 and "step_000002/model.safetensors" in result.stderr


QUICK = ("train.eval_at_start=false", "train.diagnostics=false", "train.final_iw_samples=0", "train.eval_batches=1",
         "optim.schedule=constant")  # fmt: skip


@pytest.mark.slow
def test_training_resumes_from_the_previous_checkpoint_when_the_newest_is_truncated(tmp_path, launch):
    run_dir = tmp_path / "run"
    launch(run_dir, "train.steps=2", "checkpoint.every=1", *QUICK, plain_python=True)
    checkpoints = run_dir / "checkpoints"
    _truncate(checkpoints / "step_000002" / "model.safetensors")
    result = launch(run_dir, "train.steps=2", "checkpoint.every=1", *QUICK, plain_python=True)
    assert "step_000002/model.safetensors" in result.stderr  # the damage, named in the log
    assert "resumed from" in result.stderr and "step_000001 (step 1," in result.stderr
    ckpt.verify_checkpoint(checkpoints / "step_000002")  # step 2 trained again and saved whole
    assert any(p.name.startswith("step_000002.damaged") for p in checkpoints.iterdir())

    # checkpoint.resume_from naming a damaged checkpoint: an error naming the file, no fallback.
    _truncate(checkpoints / "step_000002" / "optimizer.safetensors")
    result = launch(tmp_path / "other", "train.steps=3", f"checkpoint.resume_from={checkpoints / 'step_000002'}",
                    *QUICK, plain_python=True, expect_failure=True)  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "checkpoint.resume_from" in result.stderr and "step_000002/optimizer.safetensors" in result.stderr


# --- 4. the encoder's config is checked against its weights file before anything is allocated ---


@pytest.fixture
def exported_encoder(tmp_path, data_cache):
    from pipeline import Encoder

    torch.manual_seed(0)
    vae = VAE(_tiny_config(data_cache).model).eval()
    Encoder.from_vae(vae).save_pretrained(tmp_path / "encoder")
    return tmp_path / "encoder", vae


def _edit_config(directory, **model):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["model"].update(model)
    path.write_text(json.dumps(config))


def test_a_pretrained_encoder_still_loads_and_matches(exported_encoder):
    from pipeline import Encoder

    directory, vae = exported_encoder
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    loaded = Encoder.from_pretrained(directory)
    assert all(torch.equal(a, b) for a, b in zip(loaded.latents(images), Encoder.from_vae(vae).eval().latents(images)))


def test_an_encoder_config_with_a_huge_width_fails_fast_without_allocating(exported_encoder):
    """Width 100000: about 455 billion parameters. Run in a process whose address space is capped
    at 3 GB beyond what it holds after its imports, so building the model for real fails at once
    (instead of eating the machine's memory); checking the config against the weights' header
    must not come near that."""
    directory, _ = exported_encoder
    _edit_config(directory, width=100000)
    script = textwrap.dedent(f"""
        import resource, time
        import torch
        from pipeline import Encoder
        size = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize')) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + 3 * 2**30, resource.RLIM_INFINITY))
        start = time.perf_counter()
        try:
            Encoder.from_pretrained({str(directory)!r})
        except Exception as err:
            print(type(err).__name__, err)
        print('seconds', time.perf_counter() - start)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    message, seconds = result.stdout.strip().rsplit("\n", 1)
    assert float(seconds.split()[1]) < 30, result.stdout
    assert message.startswith("ValueError"), message
    for text in ("config.json", "encoder.safetensors", "bottom_up.stem.weight", "[100000, 3, 3, 3]", "[16, 3, 3, 3]"):
        assert text in message, message


def test_an_encoder_config_that_differs_in_architecture_names_the_first_differing_tensor(exported_encoder):
    from pipeline import Encoder

    directory, _ = exported_encoder
    _edit_config(directory, latent_channels=6)
    with pytest.raises(ValueError) as info:
        Encoder.from_pretrained(directory)
    assert "[12, 4, 1, 1]" in str(info.value) and "[8, 4, 1, 1]" in str(info.value), info.value
    _edit_config(directory, latent_channels=4, encoder_blocks="32x2,32d2,16x1,16d2,8x1,8d2,4x1")
    with pytest.raises(ValueError, match="bottom_up.blocks.7.*not in encoder.safetensors"):
        Encoder.from_pretrained(directory)


# --- 5. the shards' image size and channels against the model, at start --------------------------


@pytest.fixture(scope="module")
def fashion_shards(tmp_path_factory):
    """Fashion-MNIST shards at 28x28 and at 32x32, grayscale, each with a manifest."""
    root = tmp_path_factory.mktemp("fmnist")
    out = {}
    for name, extra in (("28", []), ("32", ["--resolution", "32"])):
        assert write_shards([str(FASHION_MNIST / "t10k-images-idx3-ubyte.gz"), str(root / name), "--samples-per-shard",
                             "16", "--limit", "32", "--heldout-fraction", "0.5", *extra]) == 0  # fmt: skip
        out[name] = root / name / "manifest.json"
    return out


def _fit(*overrides: str, manifest) -> None:
    cfg = load_config(None, TINY_MODEL + list(overrides))
    runs.check_shards_fit_model(cfg, f"{manifest}#train", f"{manifest}#heldout")


def test_28x28_grayscale_shards_into_a_32x32_rgb_model_are_refused_naming_both(fashion_shards):
    with pytest.raises(DataError) as info:
        _fit(manifest=fashion_shards["28"])
    for text in (str(fashion_shards["28"]), "28x28", "1 channel", "model.resolution=32", "model.channels=3"):
        assert text in str(info.value), info.value


def test_grayscale_shards_into_an_rgb_model_only_when_asked(fashion_shards):
    with pytest.raises(DataError, match="data.grayscale_to_rgb"):
        _fit(manifest=fashion_shards["32"])
    _fit("data.grayscale_to_rgb=true", manifest=fashion_shards["32"])
    _fit("model.channels=1", manifest=fashion_shards["32"])


def test_rgb_shards_into_a_grayscale_model_are_refused(builtin_urls):
    cfg = load_config(None, TINY_MODEL + ["model.channels=1"])
    with pytest.raises(DataError, match="3 channels.*model.channels=1"):
        runs.check_shards_fit_model(cfg, *builtin_urls)  # shard patterns: the manifest beside them is found
    runs.check_shards_fit_model(load_config(None, TINY_MODEL), *builtin_urls)


@pytest.mark.slow
def test_training_on_shards_of_another_size_stops_at_start_with_a_data_error(tmp_path, launch, fashion_shards):
    manifest = fashion_shards["28"]
    result = launch(tmp_path / "run", f"data.train_urls={manifest}#train", f"data.eval_urls={manifest}#heldout",
                    "train.steps=1", *QUICK, plain_python=True, expect_failure=True)  # fmt: skip
    assert result.returncode == 3, result.stderr[-3000:]
    assert "KeyError" not in result.stderr and "Traceback" not in result.stderr
    assert "data error:" in result.stderr and "28x28" in result.stderr and "model.resolution=32" in result.stderr
