"""Faults of issue #14 ("nothing lost, nothing faked, nothing hung") on the data side and around
the run: shards that never give an image, paths that do not exist, a held-out set without a
readable image, two launches on one run directory. Each must end in a clear error naming the
path, never in a hang, a made-up score or lost steps."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

from tests.conftest import REPO


def _text_tar(path) -> str:
    """A well-formed tar that holds no image: text files only."""
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            data = f"not an image {i}\n".encode()
            info = tarfile.TarInfo(f"sample{i:03d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _iterate(urls: list[str], *, num_workers: int, timeout: float = 60, max_skip_fraction: float = 0.05,
             **settings) -> subprocess.CompletedProcess:  # fmt: skip
    """Take batches from the resampled loader in a fresh process (logging to stderr, as training
    does; workers log there too); killed after ``timeout`` seconds if it hangs. Prints each
    batch's size, then the fault counts."""
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        from pipeline.data.loader import EpochIterator, make_loader
        from pipeline.data.plan import Shard
        from pipeline.data.streams import DataError
        # Shards given as they are: a path that goes missing after the start, as a URL would.
        shards = [Shard(url, None) for url in {urls!r}]
        batches = EpochIterator(*make_loader(shards, batch_size=4, mode="resampled", epoch_batches=3,
                                             shuffle_buffer=8, num_workers={num_workers}, **{settings!r}),
                                 max_skip_fraction={max_skip_fraction})
        try:
            for _ in range(3):
                print("batch", next(batches)["image"].shape[0])
            print("counts", batches.counts())
        except DataError as err:
            print("DataError:", err)
            sys.exit(3)
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=timeout)


# --- 1. resampled mode over shards that never give an image: an error, not a hang ----------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resampled_shards_without_images_stop_with_a_data_error_not_a_hang(tmp_path, num_workers):
    missing = str(tmp_path / "absent-000000.tar")
    text = _text_tar(tmp_path / "text.tar")
    for urls in ([missing], [text], [missing, text]):
        started = time.monotonic()
        result = _iterate(urls, num_workers=num_workers)
        assert result.returncode == 3, (result.stdout, result.stderr[-3000:])
        assert time.monotonic() - started < 30
        assert "gave no image" in result.stdout
        for url in ([text] if text in urls else []) + ([missing] if missing in urls else []):
            assert url in result.stdout, result.stdout
        # Each broken shard is named in the log once per minute, not once per draw (before: 3 MB/s).
        assert len(result.stderr) < 20_000, result.stderr[-3000:]


def test_resampled_draws_past_a_missing_shard_among_good_ones(tmp_path, builtin_urls):
    import webdataset as wds

    good = wds.shardlists.expand_urls(builtin_urls[0])[:1]
    result = _iterate([*good, str(tmp_path / "absent.tar")], num_workers=0)
    assert result.returncode == 0, (result.stdout, result.stderr[-3000:])
    assert result.stdout.count("batch 4") == 3


def _corrupt_images_tar(path, image_format: str) -> str:
    """A well-formed tar whose samples each hold an image member cut in half (what a copy cut
    short inside each file, or bit rot, leaves): present, but undecodable."""
    import numpy as np

    from pipeline.data.shards import encode_image

    whole = encode_image(np.full((32, 32, 3), 128, np.uint8), image_format)
    with tarfile.open(path, "w") as tar:
        for i in range(6):
            for name, data in ((f"s{i:03d}.{image_format}", whole[: len(whole) // 2]), (f"s{i:03d}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_resampled_shards_whose_images_are_all_corrupt_stop_with_a_data_error_not_a_hang(tmp_path):
    import re

    corrupt = [_corrupt_images_tar(tmp_path / "png.tar", "png"), _corrupt_images_tar(tmp_path / "jpg.tar", "jpg")]
    started = time.monotonic()
    # Before: the worker drew again for ever, a batch could never fill (a warning per sample).
    result = _iterate(corrupt, num_workers=2, max_skip_fraction=0.5)
    assert result.returncode == 3, (result.stdout, result.stderr[-3000:])
    assert time.monotonic() - started < 30
    found = re.search(r"(\d+) drawn samples could not be decoded, more than data.max_skip_fraction=0.5 of the (\d+)",
                      result.stdout)  # fmt: skip
    assert found, result.stdout
    counted, planned = int(found[1]), int(found[2])
    assert counted == planned // 2 + 1  # every one counted, up to the bound (0.5 of 8 or 4 per worker)
    assert any(url in result.stdout for url in corrupt)


def test_resampled_draws_past_corrupt_images_counting_them(tmp_path, builtin_urls):
    import webdataset as wds

    good = wds.shardlists.expand_urls(builtin_urls[0])[:1]
    result = _iterate([*good, _corrupt_images_tar(tmp_path / "png.tar", "png")], num_workers=0, max_skip_fraction=1.0)
    assert result.returncode == 0, (result.stdout, result.stderr[-3000:])
    assert result.stdout.count("batch 4") == 3  # full batches: a corrupt sample is replaced by another draw
    counts = eval(result.stdout.partition("counts ")[2])
    assert counts["decoded"] == 12 and counts["corrupt"] == result.stderr.count("skipping sample '")


@pytest.mark.slow
def test_training_on_shards_without_images_exits_with_a_data_error_and_does_not_hang_at_exit(tmp_path, launch,
                                                                                           builtin_urls):
    # Before: the error was printed, then the process waited forever at exit for its loader
    # workers (which ignore SIGTERM), the iterator kept alive by the worker's traceback.
    text = _text_tar(tmp_path / "text.tar")
    result = launch(tmp_path / "run", f"data.train_urls={text}", f"data.eval_urls={builtin_urls[1]}", "data.mode=resampled",
                    "data.epoch_batches=3", "data.num_workers=2", "train.steps=2", "train.eval_at_start=false",
                    "tracking.enabled=false", plain_python=True, expect_failure=True, timeout=120)  # fmt: skip
    assert result.returncode == 3, result.stderr[-3000:]
    assert "data error:" in result.stderr and "gave no image" in result.stderr and text in result.stderr


# --- 2. a path that matches no file says so --------------------------------------------------------


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_a_shard_path_or_pattern_that_matches_no_file_is_named_as_missing(tmp_path, mode):
    from pipeline.data.loader import make_loader
    from pipeline.data.streams import DataError

    settings = {"mode": mode, "epoch_batches": 3}
    for spec in (str(tmp_path / "train-{000000..000003}.tar"), str(tmp_path / "one.tar"), [str(tmp_path / "one.tar")]):
        with pytest.raises(DataError) as info:
            make_loader(spec, batch_size=4, **settings)
        message = str(info.value)
        assert "does not exist" in message and str(tmp_path) in message, message
        assert "sample count" not in message and "resampled" not in message
    with pytest.raises(DataError, match=f"manifest {tmp_path}/manifest.json does not exist"):
        make_loader(f"{tmp_path}/manifest.json#train", batch_size=4, **settings)


def test_some_missing_shards_of_a_pattern_are_left_to_the_loader(tmp_path):
    from pipeline.data.urls import resolve_shards
    from pipeline.data.streams import StreamOptions

    _text_tar(tmp_path / "train-000001.tar")
    shards = resolve_shards(str(tmp_path / "train-{000000..000002}.tar"), StreamOptions())
    assert len(shards) == 3


# --- 3. a held-out set without a readable image: an error, never 0.0, and no step lost ------------


@pytest.fixture
def own_data(tmp_path, builtin_urls):
    """A copy of the embedded dataset (its held-out shards get damaged): (train, held-out) patterns
    and the held-out shard paths."""
    import shutil

    import webdataset as wds

    source = builtin_urls[0].rpartition("/")[0]
    shutil.copytree(source, tmp_path / "data")
    train, heldout = (str(tmp_path / "data" / url.rpartition("/")[2]) for url in builtin_urls)
    return train, heldout, wds.shardlists.expand_urls(heldout)


def _without_images(paths: list[str]) -> None:
    import os

    for path in paths:  # replaced by rename, as a rewrite would be: a reader's memory map stays valid
        os.replace(_text_tar(f"{path}.new"), path)


def _trainer(tmp_path, train: str, heldout: str, *overrides: str):
    from pipeline.config import load_config
    from pipeline.distributed import make_accelerator
    from pipeline.trainer import Trainer
    from tests.conftest import TINY_MODEL

    cfg = load_config(None, [*TINY_MODEL, f"train.run_dir={tmp_path / 'run'}", f"data.train_urls={train}",
                             f"data.eval_urls={heldout}", "data.batch_size=8", "data.num_workers=0", "train.steps=2",
                             "checkpoint.every=1000", "train.eval_at_start=false", "train.diagnostics=false",
                             "train.final_iw_samples=0", "train.eval_batches=1", "tracking.enabled=false", *overrides])  # fmt: skip
    return Trainer(cfg, make_accelerator(cfg))


def test_a_heldout_set_without_a_readable_image_is_refused_at_start(tmp_path, own_data):
    from pipeline.data.streams import DataError

    train, heldout, paths = own_data
    _without_images(paths)
    with pytest.raises(DataError, match="gave no readable image") as info:
        _trainer(tmp_path, train, heldout)
    assert heldout in str(info.value)


def test_a_heldout_set_unreadable_mid_run_fails_clearly_after_the_final_checkpoint(tmp_path, own_data):
    from pipeline.data.streams import DataError

    train, heldout, paths = own_data
    trainer = _trainer(tmp_path, train, heldout)
    _without_images(paths)  # after the start's check: the final evaluation finds no image
    with pytest.raises(DataError, match="gave no readable image to evaluate") as info:
        trainer.fit()  # before: "held-out 0.0000 bits/dim", then a failed image grid, no checkpoint
    assert heldout in str(info.value)
    assert (tmp_path / "run" / "checkpoints" / "step_000002" / "model.safetensors").exists()
    trainer.close("FAILED")


# --- 4. a shard that holds more samples than its manifest says: an error, not samples dropped -----


@pytest.mark.parametrize("compressed", [False, True], ids=["mapped", "streamed"])
def test_a_shard_with_more_samples_than_its_manifest_says_is_a_data_error(tmp_path, builtin_urls, compressed):
    import gzip
    import json
    import shutil
    from pathlib import Path

    from pipeline.data.loader import EpochIterator, make_loader
    from pipeline.data.streams import DataError

    folder = Path(builtin_urls[0]).parent
    entry = json.loads((folder / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    name = entry["name"] + (".gz" if compressed else "")
    with open(folder / entry["name"], "rb") as source, (gzip.open if compressed else open)(tmp_path / name, "wb") as out:
        shutil.copyfileobj(source, out)  # gzip: read front to back (StreamedShards), else memory-mapped
    stale = entry["samples"] - 6  # as if 6 samples were appended after the manifest was written
    manifest = {"splits": {"train": {"samples": stale, "shards": [{**entry, "name": name, "samples": stale}]}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    batches = EpochIterator(*make_loader(f"{tmp_path}/manifest.json#train", batch_size=8, mode="epoch"))
    with pytest.raises(DataError) as info:
        for _ in range(stale // 8 + 1):  # before: a warning, and the 6 samples dropped every epoch
            next(batches)
    found = "256 samples with an image, more than the 250" if not compressed else "more samples with an image than the 250"
    assert f"shard {tmp_path / name} holds {found} its manifest says" in str(info.value)
    assert "pipeline-shards index" in str(info.value)


# --- 5. a shard changed since its manifest: caught by data.verify_checksums and pipeline-shards verify


@pytest.fixture
def copied_shards(tmp_path, builtin_urls):
    """A copy of the embedded dataset's shards and manifest, to damage."""
    import shutil
    from pathlib import Path

    shutil.copytree(Path(builtin_urls[0]).parent, tmp_path / "data")
    return tmp_path / "data"


def _flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside an image's bytes: the tar still reads
    path.write_bytes(bytes(data))


def _verify_cli(target) -> subprocess.CompletedProcess:
    # One image decoded per shard for the size check (every one by default): quicker, enough here.
    return subprocess.run([sys.executable, "-m", "pipeline.data.shards", "verify", str(target), "--sample-images", "1"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip


def test_a_flipped_byte_in_a_shard_is_caught_by_both_checks_and_a_good_set_passes(copied_shards):
    import hashlib
    import json

    from pipeline.data.streams import DataError, StreamOptions
    from pipeline.data.verify import verify_checksums

    manifest = copied_shards / "manifest.json"
    shards = json.loads(manifest.read_text())["splits"]
    specs = [f"{manifest}#train", str(copied_shards / shards["heldout"]["pattern"])]  # a manifest, and a pattern
    total = len(shards["train"]["shards"]) + len(shards["heldout"]["shards"])
    assert verify_checksums(specs, StreamOptions()) == total
    good = _verify_cli(copied_shards)
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"{total} of {total} shards match" in good.stdout and "BAD" not in good.stdout

    for name in (shards["train"]["shards"][3]["name"], shards["heldout"]["shards"][1]["name"]):
        _flip_a_byte(copied_shards / name)
    expected = shards["train"]["shards"][3]["sha256"]
    actual = hashlib.sha256((copied_shards / shards["train"]["shards"][3]["name"]).read_bytes()).hexdigest()
    with pytest.raises(DataError) as info:
        verify_checksums(specs, StreamOptions())
    message = str(info.value)
    assert message.startswith("2 of 19 shards do not match the sha256 of their manifest"), message
    assert f"{copied_shards / shards['train']['shards'][3]['name']}: expected sha256 {expected}, got {actual}" in message

    bad = _verify_cli(copied_shards / "manifest.json")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    lines = [line for line in bad.stdout.splitlines() if line.startswith("BAD ")]
    assert len(lines) == 2, bad.stdout
    assert any(line.startswith(f"BAD train {copied_shards / shards['train']['shards'][3]['name']}: sha256 {actual}, "
                               f"the manifest says {expected}") for line in lines), lines  # fmt: skip
    assert any(line.startswith(f"BAD heldout {copied_shards / shards['heldout']['shards'][1]['name']}: sha256 ")
               for line in lines), lines
    assert f"{total - 2} of {total} shards match" in bad.stdout and "2 bad" in bad.stdout


def test_the_verify_command_checks_sample_counts_and_image_sizes_against_the_manifest(copied_shards):
    import json

    path = copied_shards / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["image_size"] = 28  # the shards hold 32x32 images
    manifest["splits"]["heldout"]["shards"][0]["samples"] += 1
    path.write_text(json.dumps(manifest))
    result = _verify_cli(path)
    assert result.returncode == 1
    heldout = copied_shards / manifest["splits"]["heldout"]["shards"][0]["name"]
    assert f"BAD heldout {heldout}: 256 samples with an image, the manifest says 257; images of 32x32, the manifest " \
           "says 28x28" in result.stdout, result.stdout  # fmt: skip
    assert "0 of 19 shards match" in result.stdout


def test_training_with_verify_checksums_refuses_a_changed_shard_at_start(tmp_path, copied_shards):
    from pipeline.data.streams import DataError

    _flip_a_byte(copied_shards / "train-000005.tar")
    manifest = copied_shards / "manifest.json"
    with pytest.raises(DataError) as info:  # train.py prints it as "data error: ..." and exits 3
        _trainer(tmp_path, f"{manifest}#train", f"{manifest}#heldout", "data.verify_checksums=true")
    assert str(info.value).startswith("1 of 19 shards do not match the sha256 of their manifest")
    assert f"{copied_shards / 'train-000005.tar'}: expected sha256 " in str(info.value)
    assert not (tmp_path / "run").exists()
