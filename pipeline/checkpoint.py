"""Checkpoints: one directory per step, complete or absent, never pickled.

    <run_dir>/checkpoints/step_000200/
        model.safetensors       the weights (the model config rides in the metadata)
        ema.safetensors         their exponential moving average
        optimizer.safetensors   optimizer tensors by parameter name ("exp_avg/<name>"), their
                                step and hyperparameters as JSON in the file's metadata: the
                                same file whatever strategy (DDP, ZeRO-2/3) and number of
                                processes wrote it, so any of them can resume it
        state.json              step, data position and RNG per rank, scheduler, config, ...

A checkpoint is written into a hidden temporary directory, every file fsync'ed, then renamed
into place: a crash or a kill at any moment leaves either the previous checkpoints or the new
one, never half of one. Only then are checkpoints beyond the newest ``keep_last`` deleted.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = re.compile(r"^step_(\d{6,})$")
MODEL_FILE, EMA_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := CHECKPOINT_DIR.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
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
    flat = load_file(path)
    with safe_open(path, "pt") as f:
        rest = json.loads(f.metadata()["rest"])
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
        return final  # this step is already saved (e.g. periodic save, then the final one)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / MODEL_FILE, metadata=model_metadata)
    if ema_state is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, tmp / EMA_FILE, metadata=model_metadata)
    _save_optimizer(optimizer_state, tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1) + "\n")
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():  # an incomplete leftover (no state.json) from a crash
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    for old in list_checkpoints(root)[:-keep_last]:
        # Rename first: a kill during rmtree must not leave a half-deleted "checkpoint".
        trash = root / f".tmp-{old.name}-trash"
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return final


def load_ema(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The averaged weights of a checkpoint, if it has them."""
    file = Path(path) / EMA_FILE
    return load_file(file) if file.exists() else None


def load_checkpoint(
    path: str | Path, parameter_names: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], PortableOptimizerState, dict[str, Any]]:
    """Returns (model weights, optimizer state by parameter name, state.json contents).
    ``parameter_names`` (the model's, in order) are needed only for checkpoints written before
    the optimizer state was keyed by name."""
    path = Path(path)
    model_state = load_file(path / MODEL_FILE)
    state = json.loads((path / STATE_FILE).read_text())
    return model_state, _load_optimizer(path / OPTIMIZER_FILE, parameter_names), state


def remove_stale_temporaries(root: str | Path) -> None:
    """Delete temporary directories left by a save that was killed."""
    root = Path(root)
    if root.is_dir():
        for p in root.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)
