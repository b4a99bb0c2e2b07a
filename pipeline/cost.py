"""What a run costs, after the Green-AI survey the project started from: device-seconds, the
model's FLOPs per image, the FLOP/s achieved, and energy in joules where the hardware reports it.

Quality is read against cost: the held-out bits/dim of every evaluation is kept with the
device-hours spent until then (``eval/history.json``) and drawn as one figure at the end.

Energy is measured, never estimated: NVML's energy counter on NVIDIA GPUs, the Linux powercap
(RAPL) counters of the CPU packages when readable, otherwise "unavailable: <why>".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# One training step of an image ~= 3 forward passes: see train_flops_per_image.
TRAIN_FLOPS_PER_FORWARD = 3
POWERCAP_ROOT = Path("/sys/class/powercap")


# --- FLOPs -------------------------------------------------------------------------------------


def conv_flops_per_image(model: nn.Module, resolution: int, channels: int) -> int:
    """FLOPs of one forward pass of one ``channels`` x ``resolution`` x ``resolution`` image
    through ``model``, counted from its ``Conv2d`` and ``Linear`` layers: FLOPs = 2 x MACs
    (one multiply and one add per multiply-accumulate).

    A conv's MACs for one image are its output elements x (input channels / groups) x kernel
    height x kernel width; a linear layer's, its output elements x input features. Every layer
    is counted as often as it runs, by forward hooks on a real forward pass of a zero image
    (under ``torch.no_grad``, with the random state restored after). Run it on a model built on
    the ``meta`` device and nothing is computed or allocated (``vae_flops_per_image``).

    Left out, as in the usual MFU accounting, since they are small next to the convs of a
    convolutional VAE: bias additions, activations (GELU), the average pooling and nearest
    up-sampling, the residual and merge additions, the KL and the likelihood's elementwise
    work. For a training step see ``train_flops_per_image``.
    """
    counted = [0]

    def count(layer: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        per_image = output.numel() // output.shape[0]
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            counted[0] += per_image * (layer.in_channels // layer.groups) * kh * kw
        else:
            counted[0] += per_image * layer.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    reference = next(model.parameters())
    image = torch.zeros(1, channels, resolution, resolution, device=reference.device, dtype=reference.dtype)
    was_training = model.training
    devices = [reference.device] if reference.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            model.eval()
            model(image)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return 2 * counted[0]


def vae_flops_per_image(model_cfg: Any) -> int:
    """``conv_flops_per_image`` of the VAE a ``ModelConfig`` describes (encoder, decoder and
    likelihood head: the training forward pass), built on the ``meta`` device: no weights
    allocated, nothing computed, any model size, no collective under ZeRO-3."""
    from pipeline.model import VAE

    with torch.device("meta"):
        model = VAE(model_cfg)
    return conv_flops_per_image(model, model_cfg.resolution, model_cfg.channels)


def train_flops_per_image(forward_flops: int) -> int:
    """FLOPs of one training step per image: 3 x the forward pass. The backward pass of a conv
    or linear layer does two products of the forward's size, the gradient of its input and the
    gradient of its weights, hence forward + 2 x forward. Not counted: the first layer needs no
    input gradient (a slight overcount), the optimizer and EMA updates (per parameter, not per
    image), and the forward recomputed by ``model.grad_checkpoint`` (work the hardware does
    but the model does not need, left out as MFU does)."""
    return TRAIN_FLOPS_PER_FORWARD * forward_flops


# --- energy ------------------------------------------------------------------------------------


@dataclass
class _RaplDomain:
    path: Path
    max_range_uj: int
    last_uj: int


class EnergyMeter:
    """Joules used since ``start()``, from the counters the hardware has; ``source`` says which:
    ``"nvml"`` (this process's GPU), ``"rapl"`` (every CPU package of this machine, including
    the work of other programs on it), or ``"unavailable: <why>"``, in which case ``joules()``
    is None, never a number.

    RAPL counters wrap around at ``max_energy_range_uj`` (about 262 kJ, minutes at a few hundred
    watts): each ``joules()`` call adds the step since the last one, across one wrap. Call it at
    least once per wrap period (the trainer does at every log interval).

    ``count_node=False`` (processes other than each machine's first) reads no RAPL counter and
    reports 0 J: the packages are the machine's, and summing over its processes would count them
    once per process.
    """

    def __init__(self, device: torch.device | None = None, count_node: bool = True,
                 powercap_root: Path = POWERCAP_ROOT) -> None:  # fmt: skip
        self.device = device or torch.device("cpu")
        self.count_node = count_node
        self.powercap_root = Path(powercap_root)
        self._nvml_handle: Any = None
        self._rapl: list[_RaplDomain] = []
        self._total_j = 0.0
        self._nvml_start_mj = 0
        self.source = self._open()

    def _open(self) -> str:
        if self.device.type == "cuda":
            return self._open_nvml()
        if not self.count_node:
            return "rapl"  # the machine's first process reads it; see the class docstring
        return self._open_rapl()

    def _open_nvml(self) -> str:
        try:
            import pynvml
        except ImportError:
            return "unavailable: pynvml is not installed (pip install nvidia-ml-py)"
        try:
            pynvml.nvmlInit()
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            try:  # NVML numbers GPUs physically; CUDA_VISIBLE_DEVICES renumbers them for torch
                index = torch.cuda._get_nvml_device_index(index)
            except Exception:
                pass
            self._nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml_start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml_handle)
        except Exception as exn:  # an old GPU without the counter, a driver without NVML
            self._nvml_handle = None
            return f"unavailable: NVML energy counter not readable ({exn})"
        return "nvml"

    def _open_rapl(self) -> str:
        if not self.powercap_root.is_dir():
            return f"unavailable: no RAPL counters ({self.powercap_root} does not exist)"
        # Top-level zones (intel-rapl:0, not the core/uncore/dram subzones intel-rapl:0:0) are the packages.
        zones = sorted(p for p in self.powercap_root.glob("intel-rapl:*") if p.name.count(":") == 1)
        packages = [z for z in zones if _read_text(z / "name", "").startswith("package")]
        if not packages:
            return f"unavailable: no RAPL package domain under {self.powercap_root}"
        try:
            self._rapl = [_RaplDomain(z / "energy_uj", int(_read_text(z / "max_energy_range_uj")),
                                      int(_read_text(z / "energy_uj"))) for z in packages]  # fmt: skip
        except (OSError, ValueError) as exn:  # readable by root only on most kernels since 2020
            self._rapl = []
            return f"unavailable: RAPL counters not readable ({exn})"
        return "rapl"

    @property
    def available(self) -> bool:
        return not self.source.startswith("unavailable")

    def start(self) -> None:
        """Count from now."""
        self.joules()
        self._total_j = 0.0
        if self._nvml_handle is not None:
            import pynvml

            self._nvml_start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml_handle)

    def joules(self) -> float | None:
        """Joules since ``start()`` (or since the meter was made); None when unavailable."""
        if not self.available:
            return None
        if self._nvml_handle is not None:
            import pynvml

            used_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml_handle) - self._nvml_start_mj
            return used_mj / 1000.0
        for domain in self._rapl:
            now = int(_read_text(domain.path))
            step = now - domain.last_uj
            if step < 0:  # wrapped past max_energy_range_uj
                step += domain.max_range_uj
            self._total_j += step / 1e6
            domain.last_uj = now
        return self._total_j


def _read_text(path: Path, default: str | None = None) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        if default is None:
            raise
        return default


def energy_over_processes(accelerator: Any, meter: EnergyMeter) -> float | None:
    """Joules of every process's meter, summed; None when any is unavailable. A collective:
    every rank must call it."""
    local = meter.joules()
    total = accelerator.reduce(torch.tensor(math.nan if local is None else local, dtype=torch.float64,
                                            device=accelerator.device), reduction="sum")  # fmt: skip
    value = float(total.item())
    return None if math.isnan(value) else value


# --- the run's account -------------------------------------------------------------------------


class RunCost:
    """The cost of a run over all its starts: the earlier starts' share comes from the
    checkpoint (``state()`` is saved in it, ``earlier`` is what was saved).

    Device-seconds are the trainer's (wall-clock of each start x processes); GPU-seconds the
    same seconds when the processes run on GPUs (one GPU each). Achieved FLOP/s counts the
    training loop only: FLOPs per training image x images trained / seconds in training steps
    (evaluation, images and checkpoints excluded), over all processes together.
    """

    def __init__(self, forward_flops_per_image: int, meter: EnergyMeter, device_seconds_before: float,
                 earlier: dict[str, Any] | None = None) -> None:  # fmt: skip
        earlier = earlier or {}
        self.forward_flops_per_image = forward_flops_per_image
        self.meter = meter
        self.on_gpu = meter.device.type == "cuda"
        self.device_seconds_before = device_seconds_before
        self.gpu_seconds_before = float(earlier.get("gpu_seconds", 0.0))
        self.train_images = int(earlier.get("train_images", 0))
        self.train_seconds = float(earlier.get("train_seconds", 0.0))
        # A start without an energy reading leaves the run's total unknown for good: a partial
        # sum reported as the run's energy would be a guess.
        if earlier:
            self.energy_before_j: float | None = earlier.get("energy_j")
            self.earlier_source = str(earlier.get("energy_source", ""))
        elif device_seconds_before > 0:  # a checkpoint from before this accounting
            self.energy_before_j, self.earlier_source = None, "unavailable: not measured in an earlier start"
        else:
            self.energy_before_j, self.earlier_source = 0.0, ""
        meter.start()

    def add_training(self, images: int, seconds: float) -> None:
        """Images trained (all processes) in ``seconds`` of training loop."""
        self.train_images += images
        self.train_seconds += seconds

    def energy_source(self) -> str:
        if self.energy_before_j is None:
            return self.earlier_source
        if self.earlier_source and self.earlier_source != self.meter.source and self.meter.available:
            return f"{self.earlier_source}+{self.meter.source}"  # e.g. resumed on other hardware
        return self.meter.source

    def total_energy_j(self, this_start_j: float | None) -> float | None:
        if self.energy_before_j is None or this_start_j is None:
            return None
        return self.energy_before_j + this_start_j

    def gpu_seconds(self, device_seconds: float) -> float | None:
        """None when no start of the run used GPUs."""
        total = self.gpu_seconds_before + (device_seconds - self.device_seconds_before if self.on_gpu else 0.0)
        return total if self.on_gpu or total else None

    def report(self, device_seconds: float, this_start_j: float | None) -> dict[str, Any]:
        """The figures for ``summary.json`` (None where not measured) and, through
        ``metrics()``, for MLflow. ``this_start_j``: ``energy_over_processes`` now."""
        train_flops = train_flops_per_image(self.forward_flops_per_image)
        gpu = self.gpu_seconds(device_seconds)
        return {
            "device_seconds": device_seconds,
            "device_hours": device_seconds / 3600,
            "gpu_hours": None if gpu is None else gpu / 3600,
            "flops_per_image": self.forward_flops_per_image,
            "train_flops_per_image": train_flops,
            "train_images": self.train_images,
            "train_seconds": self.train_seconds,
            "train_flops": train_flops * self.train_images,
            "achieved_flops_per_s": train_flops * self.train_images / self.train_seconds if self.train_seconds else None,
            "energy_j": self.total_energy_j(this_start_j),
            "energy_source": self.energy_source(),
        }

    @staticmethod
    def metrics(report: dict[str, Any]) -> dict[str, float]:
        """``cost/...`` MLflow metrics: the numeric figures that were measured."""
        return {f"cost/{k}": float(v) for k, v in report.items() if isinstance(v, (int, float))}

    def state(self, device_seconds: float, this_start_j: float | None) -> dict[str, Any]:
        """What a checkpoint carries to the next start."""
        gpu = self.gpu_seconds(device_seconds)
        return {
            "gpu_seconds": gpu or 0.0,
            "train_images": self.train_images,
            "train_seconds": self.train_seconds,
            "energy_j": self.total_energy_j(this_start_j),
            "energy_source": self.energy_source(),
        }


# --- quality against cost ----------------------------------------------------------------------


def read_history(path: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """The evaluations recorded in ``path``; with ``up_to_step``, those of steps a resumed run
    still has (later ones belong to weights lost with an unsaved start)."""
    if not path.exists():
        return []
    history = json.loads(path.read_text())
    return [h for h in history if up_to_step is None or h["step"] <= up_to_step]


def record_evaluation(history: list[dict[str, Any]], step: int, device_hours: float,
                      metrics: dict[str, float]) -> list[dict[str, Any]]:  # fmt: skip
    """``history`` with this evaluation; one evaluated again at the same step (a final
    evaluation repeated after a stop) replaces the earlier one."""
    entry = {"step": step, "device_hours": device_hours, "eval/loss": metrics["eval/loss"],
             "eval_ema/loss": metrics["eval_ema/loss"]}  # fmt: skip
    return [h for h in history if h["step"] != step] + [entry]


def plot_quality_against_cost(history: list[dict[str, Any]], path: Path, report: dict[str, Any] | None = None) -> Path:
    """Held-out bits/dim of every evaluation (live and EMA weights) against the device-hours
    spent until it, as one PNG; the title quotes the run's cost (``RunCost.report``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.evaluate import save_figure

    hours = [h["device_hours"] for h in history]
    fig, axis = plt.subplots(figsize=(6.5, 4.2))
    axis.plot(hours, [h["eval/loss"] for h in history], "o-", color="tab:blue", label="live weights")
    axis.plot(hours, [h["eval_ema/loss"] for h in history], "s--", color="tab:orange", label="EMA weights")
    if history:
        last = history[-1]
        axis.annotate(f"step {last['step']}: {last['eval_ema/loss']:.3f}", (last["device_hours"], last["eval_ema/loss"]),
                      textcoords="offset points", xytext=(-10, 10), ha="right", fontsize=8)  # fmt: skip
    title = "held-out bits/dim against cost"
    if report:
        energy = f"{report['energy_j']:.0f} J" if report.get("energy_j") is not None else report.get("energy_source", "")
        title += f"\n{report['device_hours']:.4f} device-hours, {report['flops_per_image']:.3g} FLOPs/image forward, energy {energy}"
    axis.set(title=title, xlabel="device-hours (wall-clock x processes)", ylabel="negative ELBO, bits/dim")
    axis.title.set_fontsize(9)
    axis.legend()
    axis.grid(alpha=0.3)
    return save_figure(fig, path)


def save_history(history: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(history, indent=2) + "\n")
