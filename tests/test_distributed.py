"""Scale-out with real processes: `accelerate launch` with the configs/accelerate/ CPU files, 2
processes over gloo, DDP and DeepSpeed ZeRO, against one process on the same global batch.

The data make the comparison exact: Fashion-MNIST shards of 4 images (the per-process batch),
no shuffle window, so one process with batch 8 (or 4 with 2 accumulation steps) and two with
batch 4 each see the same images at every step, and the latent noise is drawn for the whole
step's batch whatever the layout (pipeline/model/noise.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import shutil
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from pipeline.checkpoint import load_checkpoint
from pipeline.config import ConfigError, load_config
from pipeline.data.shards import main as write_shards
from pipeline.distributed import check_launcher_precision, deepspeed_config
from tests.conftest import FASHION_MNIST, REPO, launch_command
from tests.conftest import test_environment as environment  # (an alias: pytest would collect test_*)

pytestmark = pytest.mark.slow

STEPS = 3
# Batch, shuffle, evaluation and reporting settings every run here shares; the global batch is 8.
COMMON = (
    "model.channels=1", "data.shuffle_buffer=1", "data.num_workers=0", "optim.schedule=constant",
    "train.eval_at_start=false", "train.diagnostics=false", "train.final_iw_samples=0", "train.eval_batches=1",
    "checkpoint.every=1", "checkpoint.keep_last=5", f"train.steps={STEPS}",
)  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """48 training images in 12 shards of 4 (the per-process batch); evaluation reads them too
    (a held-out split drawn at random would leave a shard of another size)."""
    out = tmp_path_factory.mktemp("fmnist-4")
    assert write_shards([str(FASHION_MNIST / "train-images-idx3-ubyte.gz"), str(out), "--samples-per-shard", "4",
                         "--resolution", "32", "--limit", "48", "--name", "f"]) == 0  # fmt: skip
    manifest = out / "manifest.json"
    return (f"data.train_urls={manifest}#train", f"data.eval_urls={manifest}#train")


def _train(launch, tmp_path_factory, name, shards, *overrides, **options):
    run_dir = tmp_path_factory.mktemp("dist") / name
    launch(run_dir, *COMMON, *shards, *overrides, **options)
    return run_dir


@pytest.fixture(scope="module")
def one_process(launch, tmp_path_factory, shards):
    return _train(launch, tmp_path_factory, "one", shards, "data.batch_size=8")


@pytest.fixture(scope="module")
def ddp(launch, tmp_path_factory, shards):
    return _train(launch, tmp_path_factory, "ddp", shards, "data.batch_size=4", accelerate_config="cpu_ddp", num_processes=2)


@pytest.fixture(scope="module")
def zero2(launch, tmp_path_factory, shards):
    return _train(launch, tmp_path_factory, "zero2", shards, "data.batch_size=4", accelerate_config="cpu_zero2",
                  num_processes=2)  # fmt: skip


def _weights(run_dir, step=STEPS):
    return load_file(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors")


def _losses(run_dir):
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"]
    return [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]


def _assert_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < atol, f"largest parameter difference {worst:.3g}"


def _state(run_dir, step=STEPS):
    return json.loads((run_dir / "checkpoints" / f"step_{step:06d}" / "state.json").read_text())


def test_two_process_ddp_trains_the_weights_one_process_does(one_process, ddp):
    assert _state(ddp)["world_size"] == 2 and _state(ddp)["strategy"] == "distributedtype.multi_cpu"
    assert _state(one_process)["world_size"] == 1
    reference, parallel = _weights(one_process), _weights(ddp)
    # The weights moved (lr 2e-3 for 3 steps), and moved the same way up to float32 sums.
    assert max((reference[k] - _weights(one_process, 1)[k]).abs().max().item() for k in reference) > 1e-3
    _assert_close(reference, parallel, atol=1e-5)
    assert _losses(ddp) == pytest.approx(_losses(one_process), abs=1e-5)


def test_two_accumulation_steps_of_4_equal_one_step_of_8(one_process, launch, tmp_path_factory, shards):
    accumulated = _train(launch, tmp_path_factory, "accum", shards, "data.batch_size=4", "train.grad_accum_steps=2")
    _assert_close(_weights(one_process), _weights(accumulated), atol=1e-5)
    assert _state(accumulated)["step"] == STEPS


def test_deepspeed_zero2_on_two_processes_matches_ddp(ddp, zero2):
    state = _state(zero2)
    assert state["world_size"] == 2 and state["strategy"] == "deepspeed-zero2"
    assert _losses(zero2) == pytest.approx(_losses(ddp), abs=1e-4)
    _assert_close(_weights(ddp), _weights(zero2), atol=1e-4)


def test_deepspeed_zero3_on_two_processes_matches_ddp(ddp, launch, tmp_path_factory, shards):
    zero3 = _train(launch, tmp_path_factory, "zero3", shards, "data.batch_size=4", accelerate_config="cpu_zero3",
                   num_processes=2, timeout=300)  # fmt: skip
    assert _state(zero3)["strategy"] == "deepspeed-zero3"
    assert _losses(zero3) == pytest.approx(_losses(ddp), abs=1e-4)
    _assert_close(_weights(ddp), _weights(zero3), atol=1e-4)


def _assert_same_checkpoint(a, b):
    """Weights, EMA and optimizer state identical; the step and schedule too."""
    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    _, opt_a, state_a = load_checkpoint(a)
    _, opt_b, state_b = load_checkpoint(b)
    assert opt_a.step == opt_b.step and opt_a.tensors.keys() == opt_b.tensors.keys()
    for name, moments in opt_a.tensors.items():
        assert all(torch.equal(moments[k], opt_b.tensors[name][k]) for k in moments), name
    assert state_a["scheduler"] == state_b["scheduler"] and state_a["step"] == state_b["step"]


def test_checkpoints_move_between_strategies_and_process_counts(zero2, ddp, one_process, launch, tmp_path_factory,
                                                                                  shards):  # fmt: skip
    saved = zero2 / "checkpoints" / f"step_{STEPS:06d}"
    # ZeRO-2 (2 processes) -> plain DDP (1 process): loaded and written again, nothing changes.
    one = _train(launch, tmp_path_factory, "from-zero2", shards, "data.batch_size=8", f"checkpoint.resume_from={saved}")
    _assert_same_checkpoint(saved, one / "checkpoints" / f"step_{STEPS:06d}")
    # And back: 1 process -> ZeRO-2 (2 processes) likewise: the ZeRO partitions are filled and gathered again.
    saved = one_process / "checkpoints" / f"step_{STEPS:06d}"
    again = _train(launch, tmp_path_factory, "from-ddp", shards, "data.batch_size=4", f"checkpoint.resume_from={saved}",
                   accelerate_config="cpu_zero2", num_processes=2)  # fmt: skip
    _assert_same_checkpoint(saved, again / "checkpoints" / f"step_{STEPS:06d}")
    # DDP (2 processes) -> ZeRO-3, where the weights themselves are partitioned.
    saved = ddp / "checkpoints" / f"step_{STEPS:06d}"
    third = _train(launch, tmp_path_factory, "from-ddp-3", shards, "data.batch_size=4", f"checkpoint.resume_from={saved}",
                   accelerate_config="cpu_zero3", num_processes=2, timeout=300)  # fmt: skip
    _assert_same_checkpoint(saved, third / "checkpoints" / f"step_{STEPS:06d}")
    # And training goes on from a 2-process ZeRO-2 checkpoint in 1 process, data epoch continued.
    on = _train(launch, tmp_path_factory, "onwards", shards, "data.batch_size=8", "train.steps=5",
                f"checkpoint.resume_from={zero2 / 'checkpoints' / 'step_000002'}")  # fmt: skip
    state = _state(on, 5)
    assert state["step"] == 5 and state["world_size"] == 1
    assert state["data"][0]["epoch"] == 0 and state["data"][0]["earlier"], "the epoch continued under the new layout"


def test_ddp_across_two_machines(shards, data_cache, tmp_path):
    """configs/accelerate/cpu_ddp_nodes.yaml: two launchers (machine ranks 0 and 1) meet at the
    first one's address, one process each, as two nodes would."""
    run_dir = tmp_path / "nodes"
    port = str(_free_port())
    commands = [
        launch_command(run_dir, *COMMON, *shards, "data.batch_size=4", "train.steps=2", data_cache=data_cache,
                       accelerate_config="cpu_ddp_nodes", num_processes=2,
                       launcher_args=("--machine_rank", str(rank), "--main_process_port", port))  # fmt: skip
        for rank in (0, 1)
    ]
    procs = [subprocess.Popen(c, cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in commands]  # fmt: skip
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert _state(run_dir, 2)["world_size"] == 2


def _free_port():
    from tests.conftest import free_port

    return free_port()


def test_an_error_on_one_rank_stops_every_rank_with_the_error_shown(shards, data_cache, tmp_path, launch):
    """Rank 1's shards are missing: it stops with a data error at its first batch, while rank 0
    waits in the gradient all-reduce. The launcher ends the job within seconds, not never."""
    from pipeline.data.plan import epoch_plan
    from pipeline.data.streams import StreamOptions
    from pipeline.data.urls import resolve_shards

    manifest = Path(shards[0].split("=", 1)[1].split("#")[0])
    train = resolve_shards(f"{manifest}#train", StreamOptions())
    plan = epoch_plan(train, epoch=0, seed=0, rank=1, world_size=2, num_workers=0, batch_size=4, shuffle=True,
                      shuffle_buffer=1, hflip=False)  # fmt: skip
    missing = {Path(part.shard.url).name for part in plan[0].parts}
    copy = tmp_path / "data"
    copy.mkdir()
    shutil.copy(manifest, copy / "manifest.json")
    for shard in manifest.parent.glob("*.tar"):
        if shard.name not in missing:
            os.symlink(shard, copy / shard.name)
    started = time.monotonic()
    result = launch(tmp_path / "run", *COMMON, f"data.train_urls={copy / 'manifest.json'}#train", shards[1],
                    "data.batch_size=4", "data.max_skip_fraction=0", "train.collective_timeout=60",
                    accelerate_config="cpu_ddp", num_processes=2, expect_failure=True)  # fmt: skip
    assert result.returncode != 0
    assert time.monotonic() - started < 120
    assert "data error" in result.stderr and "rank 1" in result.stderr


def test_a_killed_rank_stops_the_job(shards, data_cache, tmp_path):
    run_dir = tmp_path / "killed"
    command = launch_command(run_dir, *COMMON, *shards, "data.batch_size=4", "train.steps=100000",
                             "checkpoint.every=1000", "train.collective_timeout=60", data_cache=data_cache,
                             accelerate_config="cpu_ddp", num_processes=2)  # fmt: skip
    launcher = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        victim = _wait_for_rank(launcher.pid, rank=1)
        time.sleep(3)  # let it get into training
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        output = launcher.communicate(timeout=180)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert time.monotonic() - killed < 120
    assert "Signal 9" in output or "SIGKILL" in output, output[-3000:]


def _wait_for_rank(parent: int, rank: int) -> psutil.Process:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for child in psutil.Process(parent).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "train.py" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.5)
    raise AssertionError(f"no process of rank {rank} appeared")


# --- the DeepSpeed config is derived from the training config -------------------------------


def _cfg(*overrides):
    return load_config(REPO / "configs" / "quickstart.yaml", list(overrides))


def test_deepspeed_settings_come_from_the_training_config():
    config = deepspeed_config(_cfg("data.batch_size=6", "train.grad_accum_steps=3", "optim.grad_clip=50",
                                   "train.mixed_precision=bf16"), world_size=4,
                              environ={"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})  # fmt: skip
    assert config["train_micro_batch_size_per_gpu"] == 6 and config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 6 * 3 * 4 and config["gradient_clipping"] == 50
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert config["zero_optimization"]["stage"] == 3


def test_a_launcher_value_that_contradicts_the_training_config_is_refused_by_name():
    environ = {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4", "ACCELERATE_CONFIG_DS_FIELDS": "gradient_accumulation_steps"}
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=4.*train.grad_accum_steps=1"):
        deepspeed_config(_cfg(), world_size=2, environ=environ)
    deepspeed_config(_cfg("train.grad_accum_steps=4"), world_size=2, environ=environ)  # agreeing is fine


def test_a_deepspeed_json_file_may_add_settings_but_not_contradict(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2,
                                "overlap_comm": False}, "fp16": {"enabled": "auto"}}))  # fmt: skip
    config = deepspeed_config(_cfg(), world_size=2, environ={"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)})
    assert config["train_micro_batch_size_per_gpu"] == 32 and config["zero_optimization"]["overlap_comm"] is False
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(ConfigError, match="data.batch_size"):
        deepspeed_config(_cfg(), world_size=2, environ={"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)})


def test_a_launch_that_contradicts_the_training_config_stops_at_start(tmp_path, launch):
    result = launch(tmp_path / "run", "train.steps=1", accelerate_config="cpu_zero2", num_processes=2,
                    launcher_args=("--gradient_accumulation_steps", "4"), expect_failure=True)  # fmt: skip
    assert result.returncode != 0
    assert "config error" in result.stderr and "train.grad_accum_steps=1" in result.stderr


def test_a_launcher_precision_other_than_the_configs_is_refused():
    check_launcher_precision(_cfg("train.mixed_precision=bf16"), {"ACCELERATE_MIXED_PRECISION": "bf16"})
    check_launcher_precision(_cfg("train.mixed_precision=bf16"), {"ACCELERATE_MIXED_PRECISION": "no"})  # the default
    with pytest.raises(ConfigError, match=r"mixed_precision='fp16' but train.mixed_precision='bf16'"):
        check_launcher_precision(_cfg("train.mixed_precision=bf16"), {"ACCELERATE_MIXED_PRECISION": "fp16"})
