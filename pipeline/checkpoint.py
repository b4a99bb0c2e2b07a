"""Checkpoints: one directory per step, complete or absent, never pickled.

    <run_dir>/checkpoints/step_000200/
        model.safetensors       the weights (the model config rides in the metadata)
        ema.safetensors         their exponential moving average
        optimizer.safetensors   optimizer tensors by parameter name ("exp_avg/<name>"), their
                                step and hyperparameters as JSON in the file's metadata: the
                                same file whatever strategy (DDP, ZeRO-2/3) and number of
                                processes wrote it, so any of them can resume it
        state.json              step, data position and RNG per rank, scheduler, config, ...
        checksums.json          the sha256 of each file above, written last

A checkpoint is written into a hidden temporary directory, every file fsync'ed, then renamed
into place: a crash or a kill at any moment leaves either the previous checkpoints or the new
one, never half of one. Only then are checkpoints beyond the newest ``keep_last`` deleted.

What the rename cannot prevent is damage afterwards: a full disk or a copy that stopped half
way (a truncated file), a flipped bit. Every load therefore checks the files against
``checksums.json`` first (``verify_checkpoint``), and the run directory's checkpoint to resume
or evaluate is the newest one that passes (``newest_valid_checkpoint``): a damaged one is named,
file by file, in the log and skipped, never loaded, never deleted. Checkpoints written before
checksums were recorded still load, after a check of their files' headers.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pipeline.data.shards import file_sha256

log = logging.getLogger(__name__)

CHECKPOINT_DIR = re.compile(r"^step_(\d{6,})$")
MODEL_FILE, EMA_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"
CHECKSUMS_FILE = "checksums.json"
REQUIRED_FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)


class CheckpointError(ValueError):
    """A checkpoint that is damaged or incomplete; the message names the file and what is wrong."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoints under ``root`` (directories ``step_N`` with a ``state.json``), oldest first; not
    yet verified: ``newest_valid_checkpoint`` is the one to resume or evaluate."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := CHECKPOINT_DIR.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint directory, unverified (to load one: ``newest_valid_checkpoint``)."""
    found = list_checkpoints(root)
    return found[-1] if found else None


# --- optimizer state without pickle, keyed by parameter name ----------------------------------
#
# torch keys optimizer state by parameter position, DeepSpeed by flat partitions of its own. A
# checkpoint that any strategy can resume holds neither: it holds each parameter's full state
# under the parameter's name ("exp_avg/top_down.blocks.0.prior.c1.weight"), plus the scalars.
# ``PortableOptimizerState`` is that form; the strategies convert to and from it.

OPTIMIZER_FORMAT = 2  # 1: torch's state_dict flattened as "state.<position>.<key>" (read, not written)


@dataclass
class PortableOptimizerState:
    tensors: dict[str, dict[str, torch.Tensor]]  # parameter name -> {"exp_avg": ..., "exp_avg_sq": ...}
    step: int  # optimizer updates so far (Adam's bias correction)
    param_groups: list[dict[str, Any]]  # hyperparameters per group, "params" as parameter names


def portable_from_torch(state_dict: dict[str, Any], names: list[str]) -> PortableOptimizerState:
    """torch's ``optimizer.state_dict()`` (params by position in ``names``) -> by name."""
    tensors, steps = {}, set()
    for position, values in state_dict["state"].items():
        tensors[names[int(position)]] = {k: v for k, v in values.items() if isinstance(v, torch.Tensor) and k != "step"}
        steps.add(int(values.get("step", 0)))
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state_dict["param_groups"]]
    return PortableOptimizerState(tensors, max(steps, default=0), groups)


def torch_from_portable(portable: PortableOptimizerState, names: list[str]) -> dict[str, Any]:
    """By name -> the ``state_dict`` a torch optimizer over parameters ``names`` (in order) loads."""
    position = {name: i for i, name in enumerate(names)}
    state = {position[n]: {"step": torch.tensor(float(portable.step)), **values} for n, values in portable.tensors.items()}
    groups = [{**g, "params": [position[n] for n in g["params"]]} for g in portable.param_groups]
    return {"state": state, "param_groups": groups}


def _save_optimizer(portable: PortableOptimizerState, path: Path) -> None:
    tensors = {f"{key}/{name}": value.detach().contiguous().cpu()
               for name, values in portable.tensors.items() for key, value in values.items()}  # fmt: skip
    rest = {"format": OPTIMIZER_FORMAT, "step": portable.step, "param_groups": portable.param_groups}
    save_file(tensors, path, metadata={"rest": json.dumps(rest)})


def _load_optimizer(path: Path, names: list[str] | None) -> PortableOptimizerState:
    flat = _load_tensors(path)
    try:
        with safe_open(path, "pt") as f:
            rest = json.loads(f.metadata()["rest"])
    except (SafetensorError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: no readable optimizer metadata ({type(err).__name__}: {err})") from None
    if rest.get("format", 1) == 1:  # torch's positions: the model's parameter order gives the names
        if names is None:
            raise ValueError(f"{path} keys optimizer state by parameter position; the parameter names are needed")
        state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in rest["state"].items()}
        for key, tensor in flat.items():
            _, position, name = key.split(".", 2)
            state.setdefault(int(position), {})[name] = tensor
        return portable_from_torch({"state": state, "param_groups": rest["param_groups"]}, names)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        kind, name = key.split("/", 1)
        tensors.setdefault(name, {})[kind] = tensor
    return PortableOptimizerState(tensors, rest["step"], rest["param_groups"])


# --- RNG state as JSON -----------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *tail = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *tail))

    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])


# --- save / load ---------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: PortableOptimizerState,
    state: dict[str, Any],
    keep_last: int,
    model_metadata: dict[str, str] | None = None,
    ema_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``step_<step>`` atomically under ``root``; prune to the newest ``keep_last``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    if (final / STATE_FILE).exists():
        try:
            verify_checkpoint(final)
            return final  # this step is already saved (e.g. periodic save, then the final one)
        except CheckpointError as err:
            # A resumed run that fell back past this damaged checkpoint has reached its step
            # again. Keep the damaged one aside (for whoever wants to look) rather than delete it.
            aside = _set_aside(final)
            log.warning("%s; replacing it with the new one, the damaged one kept as %s", err, aside)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / MODEL_FILE, metadata=model_metadata)
    if ema_state is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, tmp / EMA_FILE, metadata=model_metadata)
    _save_optimizer(optimizer_state, tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1) + "\n")
    # Hashed by reading back what was just written (from the page cache): safetensors writes its
    # files itself, and serialising to bytes first to hash them on the way was slower (README).
    files = sorted(tmp.iterdir())
    checksums = {"sha256": {f.name: file_sha256(f) for f in files}, "bytes": {f.name: f.stat().st_size for f in files}}
    (tmp / CHECKSUMS_FILE).write_text(json.dumps(checksums, indent=1) + "\n")
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():  # an incomplete leftover (no state.json) from a crash
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    # A checkpoint newer than this one can only be a damaged one that the run fell back past: it
    # must not count toward keep_last, or it could push the whole ones out.
    for old in [p for p in list_checkpoints(root) if int(CHECKPOINT_DIR.match(p.name)[1]) <= step][:-keep_last]:
        # Rename first: a kill during rmtree must not leave a half-deleted "checkpoint".
        trash = root / f".tmp-{old.name}-trash"
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return final


def load_ema(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The averaged weights of a checkpoint, if it has them (the checkpoint verified first)."""
    file = Path(path) / EMA_FILE
    if not file.exists():
        return None
    verify_checkpoint(path)
    return _load_tensors(file)


def load_checkpoint(
    path: str | Path, parameter_names: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], PortableOptimizerState, dict[str, Any]]:
    """Returns (model weights, optimizer state by parameter name, state.json contents), after
    ``verify_checkpoint``: a damaged file raises CheckpointError naming it.
    ``parameter_names`` (the model's, in order) are needed only for checkpoints written before
    the optimizer state was keyed by name."""
    path = Path(path)
    state = verify_checkpoint(path)
    model_state = _load_tensors(path / MODEL_FILE)
    return model_state, _load_optimizer(path / OPTIMIZER_FILE, parameter_names), state


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError) as err:  # safetensors' own message names no file
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None


# --- verification ------------------------------------------------------------------------------


# Checkpoints this process has verified, with their files' (name, size, mtime, inode) then: the
# trainer verifies a checkpoint when it picks it and again when it loads it, and hashing a large
# one twice in a row would only cost time. Rewriting a file changes its entry, unless the rewrite
# falls in the same tick of the file system's clock as the last write before the verification
# ("racy git"): files modified less than RACY_NS before the verification are hashed every time.
RACY_NS = 2_000_000_000
_verified: dict[Path, tuple[tuple[tuple[str, int, int, int], ...], int]] = {}


def _signature(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    return tuple(sorted((f.name, (st := f.stat()).st_size, st.st_mtime_ns, st.st_ino) for f in path.iterdir()))


def _verified_before(path: Path) -> bool:
    known = _verified.get(path.resolve())
    if known is None:
        return False
    signature, verified_at = known
    return signature == _signature(path) and max(mtime for _, _, mtime, _ in signature) < verified_at - RACY_NS


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint directory before anything is loaded from it; returns its state.json.

    With ``checksums.json`` (written last by ``save_checkpoint``): every file it lists must be
    there with the recorded sha256. Without (a checkpoint written before checksums were
    recorded): the safetensors files' headers must be whole, which catches truncation but not a
    flipped bit. Either way ``state.json`` must parse. Raises CheckpointError naming the file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if not _verified_before(path):
        verified_at = time.time_ns()
        if (path / CHECKSUMS_FILE).exists():
            _check_sums(path)
        else:
            log.info("%s has no checksums (written before they were recorded): only its files' headers checked", path)
            _check_headers(path)
        _verified[path.resolve()] = (_signature(path), verified_at)
    return _read_state(path / STATE_FILE)


def _check_sums(path: Path) -> None:
    listing = path / CHECKSUMS_FILE
    try:
        listed = json.loads(listing.read_text())
        recorded, sizes = listed["sha256"], listed.get("bytes", {})
        if not isinstance(recorded, dict) or not isinstance(sizes, dict):
            raise TypeError("'sha256' or 'bytes' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{listing}: unreadable ({type(err).__name__}: {err})") from None
    for name in REQUIRED_FILES:
        if name not in recorded:
            raise CheckpointError(f"{listing}: does not list {name}")
    for name, expected in recorded.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (checksums.json lists it)")
        size = file.stat().st_size
        if name in sizes and size != sizes[name]:  # no need to hash a truncated file
            raise CheckpointError(f"{file}: damaged, {size} bytes where {sizes[name]} were written (truncated?)")
        actual = file_sha256(file)
        if actual != expected:
            raise CheckpointError(f"{file}: damaged, its sha256 {actual[:16]}... differs from the {expected[:16]}... "
                                  "recorded when it was written")  # fmt: skip


def _check_headers(path: Path) -> None:
    for name in (MODEL_FILE, OPTIMIZER_FILE, EMA_FILE):
        file = path / name
        if not file.exists():
            if name == EMA_FILE:
                continue
            raise CheckpointError(f"{file}: missing")
        try:
            with safe_open(file, "pt") as f:  # reads the header; checks it covers the file exactly
                f.keys()
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None


def _read_state(file: Path) -> dict[str, Any]:
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable ({type(err).__name__}: {err})") from None
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("config"), dict)):
        raise CheckpointError(f"{file}: not a checkpoint's state (no integer 'step' and 'config' mapping)")
    return state


def newest_valid_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that passes ``verify_checkpoint``: what a rerun
    resumes, and what pipeline-eval and pipeline-sample use by default. Each damaged one on the
    way is named in a warning and left where it is. None when there is no checkpoint at all;
    CheckpointError when there are some but every one is damaged (starting over would write
    new checkpoints beside them and hide the loss)."""
    damaged = []
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping damaged checkpoint %s: %s", path.name, err)
            damaged.append(str(err))
            continue
        if damaged:
            log.warning("using %s, the newest checkpoint that is whole (%d newer one(s) damaged, see above)",
                        path, len(damaged))  # fmt: skip
        return path
    if damaged:
        raise CheckpointError(f"every checkpoint in {root} is damaged: " + "; ".join(damaged)
                              + ". Move them away to start over")  # fmt: skip
    return None


def _set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the ``step_N`` pattern: neither listed nor pruned."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    os.rename(path, aside)
    _verified.pop(path.resolve(), None)
    return aside


def remove_stale_temporaries(root: str | Path) -> None:
    """Delete temporary directories left by a save that was killed."""
    root = Path(root)
    if root.is_dir():
        for p in root.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)
