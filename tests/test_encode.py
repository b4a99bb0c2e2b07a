"""pipeline-encode on Fashion-MNIST shards: every key once, the encoder's own latents, the same
output from 2 processes as from 1, and a resume after a kill (or a half-written output) that
neither loses nor repeats a sample."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline import Encoder
from pipeline.config import load_config
from pipeline.data.loader import make_loader
from pipeline.data.shards import main as write_shards
from pipeline.data.urls import resolve_shards
from pipeline.data.streams import StreamOptions
from pipeline.model import VAE
from tests.conftest import FASHION_MNIST, REPO, TINY_MODEL

BATCH = 5  # not a divisor of the shard size: batches end inside shards too


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """48 Fashion-MNIST test images, 32x32 grayscale, in 6 shards of 8."""
    out = tmp_path_factory.mktemp("fmnist-encode")
    assert write_shards([str(FASHION_MNIST / "t10k-images-idx3-ubyte.gz"), str(out), "--samples-per-shard", "8",
                         "--resolution", "32", "--limit", "48", "--name", "f"]) == 0  # fmt: skip
    return f"{out / 'manifest.json'}#train"


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vae = VAE(load_config(None, TINY_MODEL + ["model.channels=1"]).model)
    with torch.no_grad():  # away from the initial state, so that every image gets its own latents
        for p in vae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("encode-encoder") / "encoder"
    Encoder.from_vae(vae).save_pretrained(directory)
    return directory


def encode(encoder_dir, shards, out, *args, env=None, wait=True):
    command = [sys.executable, "-m", "pipeline.encode", "--encoder", str(encoder_dir), "--shards", shards,
               "--out", str(out), "--batch-size", str(BATCH), *args]  # fmt: skip
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} | (env or {})
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)


def read_output(out: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]], list[str]]:
    """(manifest, latents per key, every key in the order read) through webdataset's decoder."""
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    keys, latents = [], {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        keys.append(sample["__key__"])
        latents[sample["__key__"]] = {k: v for k, v in sample.items() if k.endswith(".npy")}
    return manifest, latents, keys


def input_batches(shards: str):
    """The input images batched as pipeline-encode batches them: per shard, BATCH at a time."""
    for shard in resolve_shards(shards, StreamOptions()):
        yield from make_loader([shard], batch_size=BATCH, train=False, channels=1)[0]


@pytest.fixture(scope="module")
def one_rank(encoder_dir, shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / "one"
    result = encode(encoder_dir, shards, out, "--with-log-std")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 shards encoded (48 samples)" in result.stdout and "manifest written" in result.stdout
    return out


def test_every_key_once_with_the_encoder_s_own_latents(one_rank, encoder_dir, shards):
    manifest, latents, keys = read_output(one_rank)
    encoder = Encoder.from_pretrained(encoder_dir)
    expected_keys = []
    for batch in input_batches(shards):
        expected_keys += batch["key"]
        groups = encoder(batch["image"])
        for j, key in enumerate(batch["key"]):
            for g in groups:
                assert torch.equal(torch.from_numpy(latents[key][f"mean_{g.index:02d}.npy"]), g.mean[j]), key
                assert torch.equal(torch.from_numpy(latents[key][f"log_std_{g.index:02d}.npy"]), g.log_std[j]), key
    assert len(keys) == len(set(keys)) == 48 and sorted(keys) == sorted(expected_keys)
    assert set(latents[keys[0]]) == {f"{kind}_{i:02d}.npy" for kind in ("mean", "log_std") for i in range(7)}
    assert latents[keys[0]]["mean_06.npy"].shape == (4, 32, 32) and latents[keys[0]]["mean_06.npy"].dtype == np.float32
    split = manifest["splits"]["train"]
    assert split["samples"] == 48 and [s["samples"] for s in split["shards"]] == [8] * 6
    assert [s["name"] for s in split["shards"]] == [f"f-train-{i:06d}.tar" for i in range(6)]
    assert manifest["encoder_config"]["latents"]["groups"][0]["shape"] == [4, 4, 4]
    assert manifest["fields"] == ["mean_NN.npy", "log_std_NN.npy"]
    # Plain tarfile + numpy read the same arrays.
    with tarfile.open(one_rank / "f-train-000000.tar") as tar:
        member = tar.getmembers()[0]
        key, field = member.name.split(".", 1)
        assert np.array_equal(np.load(io.BytesIO(tar.extractfile(member).read())), latents[key][field])
    assert not [p.name for p in one_rank.iterdir() if p.name.endswith(".tmp")]


def test_two_ranks_write_the_same_output_as_one(one_rank, encoder_dir, shards, tmp_path):
    out = tmp_path / "two"
    ranks = [encode(encoder_dir, shards, out, "--with-log-std", env={"RANK": str(r), "WORLD_SIZE": "2"}, wait=False)
             for r in range(2)]  # fmt: skip
    results = [(p.wait(timeout=300), *p.communicate()) for p in ranks]
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    assert [("3 shards encoded (24 samples)" in stdout) for _, stdout, _ in results] == [True, True]
    # Same bytes, shard for shard (hence the same keys and latents), and the same manifest.
    one = json.loads((one_rank / "manifest.json").read_text())
    two = json.loads((out / "manifest.json").read_text())
    assert one == two


def test_a_killed_run_resumes_without_losing_or_repeating_a_sample(one_rank, encoder_dir, shards, tmp_path):
    out = tmp_path / "killed"
    process = encode(encoder_dir, shards, out, "--with-log-std", wait=False)
    deadline = time.monotonic() + 240
    while not list(out.glob("f-train-*.tar")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    finished_before = sorted(p.name for p in out.glob("f-train-*.tar"))
    assert finished_before, "no shard was finished before the kill"
    result = encode(encoder_dir, shards, out, "--with-log-std")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(finished_before)} done before" in result.stdout
    _, _, keys = read_output(out)
    assert len(keys) == len(set(keys)) == 48
    assert json.loads((out / "manifest.json").read_text()) == json.loads((one_rank / "manifest.json").read_text())
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_half_written_output_is_completed_by_another_layout(one_rank, encoder_dir, shards, tmp_path):
    """Rank 0 of 2 alone (rank 1 never ran), plus the temporary file of a shard whose writer died:
    one process then encodes exactly the missing shards, and leaves the finished ones untouched."""
    out = tmp_path / "half"
    result = encode(encoder_dir, shards, out, "--with-log-std", "--rank", "0", "--world-size", "2")
    assert result.returncode == 0 and "other ranks' shards still to come" in result.stdout, result.stderr[-3000:]
    assert not (out / "manifest.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("f-train-*.tar")}
    assert sorted(done) == [f"f-train-{i:06d}.tar" for i in (0, 2, 4)]
    (out / ".f-train-000001.tar.rank1.tmp").write_bytes(b"half a tar")
    result = encode(encoder_dir, shards, out, "--with-log-std")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 shards encoded (24 samples), 3 done before" in result.stdout
    assert {name: (out / name).stat().st_mtime_ns for name in done} == done
    _, _, keys = read_output(out)
    assert len(keys) == len(set(keys)) == 48
    assert json.loads((out / "manifest.json").read_text()) == json.loads((one_rank / "manifest.json").read_text())
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_samples_on_request_and_other_options_refused_on_resume(one_rank, encoder_dir, shards, tmp_path):
    out = tmp_path / "sampled"
    result = encode(encoder_dir, shards, out, "--sample")
    assert result.returncode == 0, result.stderr[-3000:]
    _, sampled, _ = read_output(out)
    _, means, _ = read_output(one_rank)
    key = next(iter(sampled))
    assert set(sampled[key]) == {f"sample_{i:02d}.npy" for i in range(7)}
    assert not np.array_equal(sampled[key]["sample_00.npy"], means[key]["mean_00.npy"])
    # An output begun with the log-stds must not be continued without them.
    result = encode(encoder_dir, shards, one_rank)
    assert result.returncode == 2 and "other options" in result.stderr and "with_log_std" in result.stderr
