"""Checkpoints: one directory per step, complete or absent, never pickled.

    <run_dir>/checkpoints/step_000200/
        model.safetensors       the weights (the model config rides in the metadata)
        ema.safetensors         their exponential moving average
        optimizer.safetensors   optimizer tensors; everything else of its state_dict as JSON
                                in the file's metadata
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


# --- optimizer state without pickle -------------------------------------------------------


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"param_groups": state_dict["param_groups"], "state": {}}
    for param_id, values in state_dict["state"].items():
        plain = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value.detach().contiguous().cpu()
            else:
                plain[name] = value
        rest["state"][str(param_id)] = plain
    return tensors, rest


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in rest["state"].items()}
    for key, tensor in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = tensor
    return {"state": state, "param_groups": rest["param_groups"]}


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
    optimizer_state: dict[str, Any],
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
    tensors, rest = flatten_optimizer_state(optimizer_state)
    save_file(tensors, tmp / OPTIMIZER_FILE, metadata={"rest": json.dumps(rest)})
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


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Returns (model weights, optimizer state_dict, state.json contents)."""
    path = Path(path)
    model_state = load_file(path / MODEL_FILE)
    opt_tensors = load_file(path / OPTIMIZER_FILE)
    with safe_open(path / OPTIMIZER_FILE, "pt") as f:
        rest = json.loads(f.metadata()["rest"])
    state = json.loads((path / STATE_FILE).read_text())
    return model_state, unflatten_optimizer_state(opt_tensors, rest), state


def remove_stale_temporaries(root: str | Path) -> None:
    """Delete temporary directories left by a save that was killed."""
    root = Path(root)
    if root.is_dir():
        for p in root.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)
