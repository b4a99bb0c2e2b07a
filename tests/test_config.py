import subprocess
import sys

import pytest

from pipeline.config import Config, ConfigError, load_config
from tests.conftest import REPO


def test_yaml_and_dotted_overrides_are_typed():
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["train.steps=7", "optim.lr=1e-3", "data.num_workers=2"])
    assert isinstance(cfg, Config)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.data.num_workers == 2
    assert cfg.model.width == 48  # from the file, untouched by the overrides
    assert cfg.flat()["train.steps"] == 7


def test_int_is_accepted_for_a_float():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(
    "override, must_mention",
    [
        ("train.stepz=3", ["train.stepz", "Did you mean 'steps'", "Allowed keys", "run_dir", "mixed_precision"]),
        ("trian.steps=3", ["trian", "Allowed keys", "train", "model", "optim"]),
        ("train.steps=abc", ["train.steps", "expected int", "'abc'"]),
        ("train.steps=true", ["train.steps", "expected int"]),
        ("train.mixed_precision=fp8", ["train.mixed_precision", "'fp8'", "'no'", "'fp16'", "'bf16'"]),
        ("data.batch_size=0", ["data.batch_size", "> 0"]),
        ("model.channels=2", ["model.channels", "1 or 3"]),
        ("model.encoder_blocks=32x1,16d2", ["16d2", "16px", "32px"]),
        ("model.decoder_blocks=4x1,8x1,32m8", ["8x1", "merge"]),
        ("train=5", ["train", "section"]),
        ("steps", ["dotted.key=value"]),
    ],
)
def test_bad_config_names_the_key_and_what_is_allowed(override, must_mention):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / "quickstart.yaml", [override])
    for text in must_mention:
        assert text in str(info.value), f"{text!r} not in {info.value}"


def test_every_shipped_config_is_valid():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_the_training_command_rejects_a_bad_key_before_doing_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "train.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
         f"train.run_dir={tmp_path / 'run'}", "train.stepz=5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "unknown config key 'train.stepz'" in result.stderr
    assert "steps" in result.stderr
    assert not (tmp_path / "run").exists()


def test_learning_rate_warms_up_then_decays_to_the_floor():
    from pipeline.trainer import lr_factor

    cfg = load_config(None, ["optim.warmup_steps=10", "train.steps=110", "optim.min_lr_ratio=0.1"])
    factors = [lr_factor(cfg, s) for s in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.55)
    assert factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    constant = load_config(None, ["optim.warmup_steps=10", "optim.schedule=constant"])
    assert lr_factor(constant, 500) == 1.0
