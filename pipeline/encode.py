"""Encode a sharded dataset: images in, latents out as new WebDataset shards plus a manifest.

    pipeline-encode --encoder runs/quickstart/encoder --shards data/x/manifest.json#train --out data/x-latents
    accelerate launch --num_processes 4 -m pipeline.encode --encoder ... --shards ... --out ...

Each input shard becomes one output shard of the same name under ``--out``, holding for every
sample the original key and one ``.npy`` (float32) per latent group and kind::

    <key>.mean_00.npy ... <key>.mean_06.npy      posterior means (default), (Z, r, r), lowest resolution first
    <key>.sample_00.npy ...                      with --sample: posterior samples instead of the means
    <key>.log_std_00.npy ...                     with --with-log-std: the posterior log-stds as well

``webdataset.WebDataset(url).decode()`` gives them as numpy arrays (``sample["mean_00.npy"]``);
plain ``tarfile`` + ``numpy.load`` reads them as well. ``manifest.json`` is the shard writer's
format (per shard: name, samples, bytes, sha256), plus the encoder's description and the options.

Processes: the rank and the number of processes come from ``--rank``/``--world-size`` or from
the environment a launcher sets (``RANK``/``WORLD_SIZE``: accelerate launch, torchrun, Slurm via
``slurm/launch.sh``). Input shard i goes to rank i mod world size, and a shard is read in order
with its own batches and seed, so the output does not depend on the number of processes.

Resuming: an output shard is written under a temporary name that carries the writing rank, and
renamed when complete; a restart (with any number of processes) skips every input shard whose
output exists, and drops the temporaries a killed run left. The process that finds every shard
done writes the manifest (atomically, the same content whoever writes it), so its presence
means the output is complete.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from pipeline.data.loader import make_loader
from pipeline.data.plan import Shard
from pipeline.data.shards import MANIFEST_NAME, _add_member, file_sha256
from pipeline.data.streams import DataError, StreamOptions, is_remote
from pipeline.data.urls import resolve_shards
from pipeline.encoder import Encoder

log = logging.getLogger(__name__)

OPTIONS_NAME = ".encode.json"  # the options of the run that began this output


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def output_name(shard: Shard) -> str:
    return PurePosixPath(shard.url.partition("?")[0]).name


def _temporary(out: Path, name: str, rank: int) -> Path:
    return out / f".{name}.rank{rank}.tmp"


def _record(out: Path, name: str) -> Path:
    """Per finished shard, its manifest entry, written before the shard's rename."""
    return out / f".{name}.json"


def rank_from_environment() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_output_dir(out: Path, shards: list[Shard]) -> None:
    names = [output_name(s) for s in shards]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise DataError(f"two input shards are named {duplicate}: their outputs would collide in {out}")
    for shard in shards:
        if not is_remote(shard.url) and Path(shard.url).resolve().parent == out.resolve():
            raise DataError(f"--out {out} holds the input shards; the latents would overwrite them")


def check_options(out: Path, options: dict[str, Any]) -> None:
    """The same options as the run that began this output, or a clear refusal: a resumed output
    with means in some shards and samples in others would be silently inconsistent."""
    path = out / OPTIONS_NAME
    if path.exists():
        before = json.loads(path.read_text())
        if before != options:
            changed = sorted(k for k in options.keys() | before.keys() if before.get(k) != options.get(k))
            raise DataError(f"{out} was begun with other options ({', '.join(changed)}: {[before.get(k) for k in changed]}"
                            f" then, {[options.get(k) for k in changed]} now); use a new --out")  # fmt: skip
        return
    tmp = out / f"{OPTIONS_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(options, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def encode_shard(encoder: Encoder, shard: Shard, out: Path, *, rank: int, batch_size: int, num_workers: int,
                 sample: bool, with_log_std: bool, seed: int, device: torch.device) -> int:  # fmt: skip
    """Write ``shard``'s latents to ``out/<its name>``; returns the samples written."""
    name = output_name(shard)
    tmp = _temporary(out, name, rank)
    loader, _ = make_loader([shard], batch_size=batch_size, train=False, num_workers=num_workers,
                            channels=encoder.cfg.channels)  # fmt: skip
    torch.manual_seed(seed)  # per shard: the same samples whichever rank encodes it
    written = 0
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for batch in loader:
                if not batch["key"]:
                    continue
                latents = encoder(batch["image"].to(device), sample=sample)
                fields = [(f"{'sample' if sample else 'mean'}_{g.index:02d}", g.z) for g in latents]
                if with_log_std:
                    fields += [(f"log_std_{g.index:02d}", g.log_std) for g in latents]
                arrays = [(field, tensor.float().cpu().numpy()) for field, tensor in fields]
                for j, key in enumerate(batch["key"]):
                    for field, array in arrays:
                        _add_member(tar, f"{key}.{field}.npy", npy_bytes(array[j]))
                written += len(batch["key"])
        entry = {"name": name, "samples": written, "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp),
                 "source": shard.url, "source_samples": shard.samples}  # fmt: skip
        record = _record(out, name)
        record.with_suffix(".json.tmp").write_text(json.dumps(entry) + "\n")
        os.replace(record.with_suffix(".json.tmp"), record)
        os.replace(tmp, out / name)  # last: the shard's final name means it is complete
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if shard.samples is not None and written != shard.samples:
        log.warning("%s: %d of %d samples encoded (the rest could not be decoded)", shard.url, written, shard.samples)
    return written


def finished_entry(out: Path, name: str) -> dict[str, Any] | None:
    if not (out / name).exists():
        return None
    return json.loads(_record(out, name).read_text())


def write_manifest_if_complete(out: Path, shards: list[Shard], split: str, info: dict[str, Any]) -> bool:
    entries = [finished_entry(out, output_name(s)) for s in shards]
    if any(e is None for e in entries):
        return False
    manifest = {
        "container": "webdataset-tar", "format": "npy", **info,
        "splits": {split: {"samples": sum(e["samples"] for e in entries), "shards": entries}},
    }  # fmt: skip
    # Several ranks may finish together and all write it: same content, each its own temporary.
    tmp = out / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / MANIFEST_NAME)
    return True


def encode_dataset(encoder: Encoder, spec: str, out: Path, *, rank: int = 0, world_size: int = 1, batch_size: int = 64,
                   num_workers: int = 0, sample: bool = False, with_log_std: bool = False, seed: int = 0,
                   device: torch.device | str = "cpu", encoder_dir: str = "") -> dict[str, int]:  # fmt: skip
    """This rank's part of encoding ``spec`` into ``out``. Returns counts: shards encoded,
    skipped (done before), samples written, and whether this rank wrote the manifest."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of {world_size} processes")
    shards = resolve_shards(spec, StreamOptions(), default_split="train")
    split = spec.partition("#")[2] or "train"
    out.mkdir(parents=True, exist_ok=True)
    check_output_dir(out, shards)
    options = {"source": spec, "encoder": encoder_dir, "sample": sample, "with_log_std": with_log_std, "seed": seed,
               "batch_size": batch_size}  # fmt: skip
    check_options(out, options)
    mine = [(i, s) for i, s in enumerate(shards) if i % world_size == rank]
    for _, shard in mine:  # what a killed run of this rank (or of any layout, for these shards) left
        for stale in out.glob(f".{output_name(shard)}.rank*.tmp"):
            stale.unlink(missing_ok=True)
    counts = {"shards": 0, "skipped": 0, "samples": 0, "manifest": 0}
    device = torch.device(device)
    for i, shard in mine:
        if finished_entry(out, output_name(shard)) is not None:
            counts["skipped"] += 1
            continue
        counts["samples"] += encode_shard(encoder, shard, out, rank=rank, batch_size=batch_size, num_workers=num_workers,
                                          sample=sample, with_log_std=with_log_std, seed=seed + i, device=device)  # fmt: skip
        counts["shards"] += 1
        log.info("rank %d: %s done (%d/%d of this rank's shards)", rank, output_name(shard),
                 counts["shards"] + counts["skipped"], len(mine))  # fmt: skip
    fields = [f"{'sample' if sample else 'mean'}_NN.npy"] + (["log_std_NN.npy"] if with_log_std else [])
    info = {"content": "latents", "fields": fields, "options": options, "encoder_config": encoder.describe()}
    counts["manifest"] = int(write_manifest_if_complete(out, shards, split, info))
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Encode sharded images into WebDataset shards of latents.")
    parser.add_argument("--encoder", required=True, type=Path, help="an exported encoder (<run_dir>/encoder)")
    parser.add_argument("--shards", required=True, help="input shards with counts: DIR/manifest.json#split")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created if missing)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="loader worker processes per rank")
    parser.add_argument("--sample", action="store_true", help="posterior samples (sample_NN.npy) instead of means")
    parser.add_argument("--with-log-std", action="store_true", help="also write the posterior log-stds (log_std_NN.npy)")
    parser.add_argument("--seed", type=int, default=0, help="with --sample: input shard i uses seed + i")
    parser.add_argument("--device", help="default: cuda:<LOCAL_RANK> where CUDA is available, else cpu")
    parser.add_argument("--rank", type=int, help="default: $RANK (set by accelerate launch / torchrun), else 0")
    parser.add_argument("--world-size", type=int, help="default: $WORLD_SIZE, else 1")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    env_rank, env_world = rank_from_environment()
    rank = env_rank if args.rank is None else args.rank
    world_size = env_world if args.world_size is None else args.world_size
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    try:
        encoder = Encoder.from_pretrained(args.encoder, device=device)
        counts = encode_dataset(encoder, args.shards, args.out, rank=rank, world_size=world_size,
                                batch_size=args.batch_size, num_workers=args.num_workers, sample=args.sample,
                                with_log_std=args.with_log_std, seed=args.seed, device=device,
                                encoder_dir=str(args.encoder))  # fmt: skip
    except (OSError, ValueError, DataError) as err:  # a missing encoder, a bad config or shards, wrong images
        print(f"pipeline-encode: {err}", file=sys.stderr)
        return 2
    done = "the manifest written" if counts["manifest"] else "other ranks' shards still to come"
    print(f"rank {rank}/{world_size}: {counts['shards']} shards encoded ({counts['samples']} samples), "
          f"{counts['skipped']} done before; {done}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
