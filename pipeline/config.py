"""The one typed config tree: every knob of a training run, with its unit and its checks.

A run is described by a YAML file plus dotted command-line overrides
(``train.steps=200 model.width=64``). Both go through the same validation, so a typo or a
wrong type fails at start with a message that names the key and what is allowed, instead of
being silently ignored hours into a job.

Written by hand rather than with OmegaConf because we want errors that list the allowed keys
and values (OmegaConf's say only "key not in struct") and ``Literal`` choices, which OmegaConf
does not support.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class DataConfig:
    train_urls: str | list[str] = ""
    """Training shards: a brace pattern (``dir/train-{000000..000009}.tar``), a list of them, or
    a manifest (``dir/manifest.json#train``); local paths, ``http(s)://`` or ``pipe:cmd``.
    Empty: the embedded default dataset, written to shards under ``cache_dir`` on first use."""
    eval_urls: str | list[str] = ""
    """Held-out shards, same forms as ``train_urls``. Empty: the ``heldout`` split of the
    training shards' manifest (or of the embedded dataset)."""
    mode: Literal["epoch", "resampled"] = "epoch"
    """``epoch``: every sample once per epoch across all processes, exact resume (needs shard
    sample counts, i.e. a manifest). ``resampled``: an endless random draw of shards per
    process, for datasets too large to count."""
    epoch_batches: int = 0
    """Batches per process per epoch in ``resampled`` mode; 0: the manifest's sample count
    divided by (processes x batch size)."""
    hflip: bool = False
    """Mirror training images left-right at random (a fixed draw per epoch and sample)."""
    grayscale_to_rgb: bool = False
    """Feed grayscale shards (their manifest says ``channels: 1``) to an RGB model
    (``model.channels=3``) by repeating the gray value in each channel. Off: such a run is
    refused at start, since it usually means the wrong shards or the wrong ``model.channels``
    (``pipeline.runs.check_shards_fit_model``)."""
    allow_pipe: bool = False
    """Allow ``pipe:`` URLs, which run shell commands taken from the config."""
    http_retries: int = 3
    """Re-opens of a remote shard after an HTTP error or a dropped connection (samples already
    read are skipped)."""
    http_timeout: float = 30.0
    """Seconds without data before a remote read fails."""
    max_skip_fraction: float = 0.05
    """Stop the run when more than this fraction of an epoch's planned samples on a process
    turn out corrupt or missing (each one is skipped with a warning and counted until then)."""
    cache_dir: str = ""
    """Where the embedded dataset's shards are written. Empty: ``$XDG_CACHE_HOME/hvae-pipeline``
    (``~/.cache/hvae-pipeline``)."""
    batch_size: int = 32
    """Images per process per step."""
    num_workers: int = 0
    """DataLoader worker processes per training process (0: read in the training process)."""
    shuffle_buffer: int = 1000
    """Window of the local sample shuffle after the shard order is shuffled: a sample moves at
    most this many places, and at most about this many samples are read ahead of use."""
    seed: int = 0
    """Seed of the shard order and sample shuffle; the same on every rank."""
    verify_checksums: bool = False
    """At start, hash every local shard that its manifest lists with a sha256 and stop with a data
    error naming any that differs (the main process of each node, before its other processes
    read; every byte is read once). Remote shards are not hashed; ``pipeline-shards verify``
    checks them."""

    def __post_init__(self) -> None:
        _check_positive(self, "batch_size", "shuffle_buffer", "http_timeout")
        _check_non_negative(self, "num_workers", "epoch_batches", "http_retries")
        if not 0 <= self.max_skip_fraction <= 1:
            raise ConfigError(f"data.max_skip_fraction: must be in [0, 1], got {self.max_skip_fraction}")


@dataclass
class ModelConfig:
    resolution: int = 32
    """Height and width of the (square) training images, in pixels."""
    channels: int = 3
    """Image channels: 3 for RGB, 1 for grayscale."""
    width: int = 64
    """Feature channels of the residual blocks (at every resolution ``widths`` does not name)."""
    widths: str = ""
    """Channels per resolution where they differ from ``width``, as ``resolution:channels``
    pairs (VDVAE's custom_width_str), e.g. ``"256:64,128:128,64:256"``."""
    bottleneck_ratio: float = 0.25
    """Channels inside a residual block, as a fraction of ``width`` (VDVAE uses 0.25)."""
    latent_channels: int = 8
    """Channels of each latent group z_i (one group per decoder block)."""
    encoder_blocks: str = "32x2,32d2,16x2,16d2,8x2,8d2,4x2"
    """Bottom-up blocks in VDVAE notation: ``RxN`` is N residual blocks at resolution R,
    ``RdK`` is one block at R followed by average-pool down-sampling by K."""
    decoder_blocks: str = "4x2,8m4,8x2,16m8,16x2,32m16,32x2"
    """Top-down blocks: ``RxN`` is N latent-group blocks at resolution R, ``RmS`` first
    up-samples the state of resolution S to R (nearest) and merges it in, then is one block."""
    likelihood: Literal["logistic_mixture", "discretized_logistic", "discretized_gaussian", "bernoulli"] = (
        "logistic_mixture"
    )
    """Pixel likelihood p(x|z), always a distribution over the data's discrete values:
    ``logistic_mixture`` (VDVAE/PixelCNN++: K logistics per pixel, RGB channels conditioned on
    each other), ``discretized_logistic`` or ``discretized_gaussian`` (one per sub-pixel), or
    ``bernoulli`` (binarised data, ``data_bits=1``)."""
    mixtures: int = 10
    """Components of the logistic mixture."""
    data_bits: int = 8
    """Bits per sub-pixel the model sees: 8, 5 (VDVAE's FFHQ-256), ... 1 for ``bernoulli``. uint8
    images are reduced to their top ``data_bits`` bits; bits/dim are per sub-pixel either way."""
    log_std_clamp: float = 5.0
    """Soft clamp of the prior's and posterior's log standard deviations, c * tanh(x / c)
    (NVAE): keeps exp() finite early in training without cutting gradients. 0: off."""
    state_bias_max_resolution: int = 64
    """The top-down pass starts each resolution from a learned constant (VDVAE's bias_xs) up to
    this resolution, and from zeros above it (a 512 x 256 x 256 constant is 33M parameters)."""
    grad_checkpoint: bool = False
    """Recompute each residual block's activations in the backward pass instead of storing
    them: less memory, about a third more compute, the same gradients."""
    standardize_input: bool = True
    """Feed the encoder each channel's pixel values standardised, (x - input_mean) / input_std
    on the 0..255 scale, so its input has std ~1 whatever the dataset (VDVAE: CIFAR-10 as
    (x - 120.64) / 64.17); the likelihood's target stays in [-1, 1]. False: the encoder sees
    the target itself, (x - 127.5) / 127.5."""
    input_mean: list[float] = field(default_factory=list)
    """Per-channel mean of the training pixels (0..255) for ``standardize_input``. Empty: taken
    from the training shards' manifest when training starts
    (``pipeline.runs.resolve_input_statistics``) and saved with the run's config; a model built
    with it empty uses 127.5, the plain [-1, 1] scaling."""
    input_std: list[float] = field(default_factory=list)
    """Per-channel std of the training pixels (0..255), as ``input_mean`` (empty: 127.5)."""

    def __post_init__(self) -> None:
        _check_positive(self, "resolution", "width", "latent_channels")
        _check_non_negative(self, "log_std_clamp")
        if self.channels not in (1, 3):
            raise ConfigError(f"model.channels: must be 1 or 3, got {self.channels}")
        _check_positive(self, "mixtures")
        try:
            self.width_at(self.resolution)
        except ValueError:
            raise ConfigError(f"model.widths: expected 'resolution:channels' pairs like '32:64,16:128', got {self.widths!r}") from None
        if (self.likelihood == "bernoulli") != (self.data_bits == 1) or not 1 <= self.data_bits <= 8:
            raise ConfigError(
                f"model.data_bits: {self.data_bits} does not fit model.likelihood={self.likelihood!r}: "
                "bernoulli needs data_bits=1, the others 2..8"
            )
        if not 0 < self.bottleneck_ratio <= 1:
            raise ConfigError(f"model.bottleneck_ratio: must be in (0, 1], got {self.bottleneck_ratio}")
        self._check_input_statistics()
        # Parsing here makes a malformed block string fail at start, not at model build.
        from pipeline.model.blocks import check_architecture, parse_decoder_blocks, parse_encoder_blocks

        try:
            check_architecture(
                parse_encoder_blocks(self.encoder_blocks, self.resolution),
                parse_decoder_blocks(self.decoder_blocks, self.resolution),
            )
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None


    def _check_input_statistics(self) -> None:
        for name in ("input_mean", "input_std"):
            values = getattr(self, name)
            if len(values) not in (0, self.channels):
                raise ConfigError(f"model.{name}: one value per channel ({self.channels}) or none, got {values}")
        if bool(self.input_mean) != bool(self.input_std):
            raise ConfigError("model.input_mean and model.input_std: give both or neither (neither: from the manifest)")
        if any(not 0 < v < float("inf") for v in self.input_std):
            raise ConfigError(f"model.input_std: must be > 0 and finite, got {self.input_std}")

    def width_at(self, resolution: int) -> int:
        """Feature channels at ``resolution``."""
        pairs = dict(tuple(int(v) for v in item.split(":")) for item in self.widths.replace(" ", "").split(",") if item)
        if any(w <= 0 for w in pairs.values()):
            raise ValueError("widths must be positive")
        return pairs.get(resolution, self.width)


@dataclass
class OptimConfig:
    lr: float = 2e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    beta2: float = 0.9
    """AdamW betas (VDVAE uses 0.9, 0.9)."""
    warmup_steps: int = 50
    """Steps of linear learning-rate warm-up from 0 to ``lr``."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """After warm-up: cosine decay from ``lr`` to ``lr * min_lr_ratio`` at ``train.steps``, or
    constant. (Raising ``train.steps`` on resume stretches the cosine from that point on.)"""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of ``lr``."""
    grad_clip: float = 200.0
    """Gradient norm clipping threshold (the global L2 norm over all parameters)."""
    implementation: Literal["for_loop", "foreach", "fused"] = "foreach"
    """AdamW's kernels, the same update: ``for_loop`` a few ops per tensor (torch's default on
    CPU), ``foreach`` each op over all tensors at once (torch's default on GPU; bitwise the same
    as ``for_loop``), ``fused`` one kernel per tensor doing the whole update (the same within
    float rounding). Measured in ``benchmarks/README.md``."""

    def __post_init__(self) -> None:
        _check_positive(self, "lr", "grad_clip")
        _check_non_negative(self, "weight_decay", "warmup_steps")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name}: must be in [0, 1), got {getattr(self, name)}")


@dataclass
class ObjectiveConfig:
    kl_warmup_steps: int = 0
    """Steps over which the KL term's weight rises linearly from 0 to 1 (0: weight 1 from the
    start). Only the training objective is weighted; the reported ELBO never is."""
    free_bits: float = 0.0
    """Free bits per latent group (Kingma et al. 2016): a group's batch-mean KL below this many
    bits per image is not penalised, so the encoder may use it instead of collapsing it."""
    skip_threshold: float = 0.0
    """Skip the update when the gradient norm exceeds this (VDVAE: 400 for CIFAR-10); 0: only
    non-finite gradients are skipped. Skips are counted and logged."""
    max_consecutive_skips: int = 50
    """Stop with a clear error after this many skipped updates in a row, instead of spinning
    without learning."""
    ema_decay: float = 0.9999
    """Decay of the exponential moving average of the weights used for evaluation and export;
    warmed up as min(decay, (1 + step) / (10 + step)) so short runs are not stuck at init."""

    def __post_init__(self) -> None:
        _check_non_negative(self, "kl_warmup_steps", "free_bits", "skip_threshold")
        _check_positive(self, "max_consecutive_skips")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"objective.ema_decay: must be in [0, 1), got {self.ema_decay}")


@dataclass
class TrainConfig:
    run_dir: str = "runs/quickstart"
    """Directory of this run: checkpoints, exported encoder, MLflow store. Running again on the
    same directory resumes from its newest checkpoint."""
    steps: int = 1000
    """Optimizer steps to train in total (a resumed run stops at the same total)."""
    seed: int = 0
    """Seed of parameter init and of the sampling noise (offset by rank)."""
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "no"
    """Autocast precision; ``no`` is float32 (the default). ``auto`` becomes, as the config is
    loaded, what measured fastest on this kind of machine (``benchmarks/README.md``): ``bf16`` on
    a CPU with AMX (Sapphire Rapids and later), where the CIFAR-10 preset's step ran 1.97x eager
    float32 (1.25x at width 64; the small presets' within noise of float32); ``no`` elsewhere:
    without AMX, bf16 is emulated and slower, and on the one GPU measured (an H200) the CIFAR-10
    and ImageNet-64 presets ran 0.61x and 0.83x in bf16 at their batch sizes (the step is bound
    by kernel launches there). The run uses and logs the resolved value."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step (the global batch is data.batch_size x this
    x processes; DeepSpeed's gradient_accumulation_steps is derived from it)."""
    collective_timeout: float = 600.0
    """Seconds a process waits in a collective (all-reduce, barrier) before it fails the run: a
    rank that died or hangs stops the others within this time instead of hanging the job."""
    eval_at_start: bool = True
    """Evaluate the untrained model at step 0 (the baseline of the run's figures). On a CPU the
    whole held-out set plus diagnostics can take minutes; turn it off for short runs."""
    log_every: int = 10
    """Steps between training metric logs."""
    eval_every: int = 200
    """Steps between evaluations on the held-out shards (and at the start and the end)."""
    eval_batches: int = 0
    """Held-out batches per evaluation per process; 0 means the whole held-out split."""
    diagnostics: bool = True
    """At each evaluation, also measure active units, collapsed groups, the aggregate posterior's
    KL to the prior and the variance ratios (EMA weights, main process)."""
    collapse_warning_share: float = 0.5
    """Warn (log and an MLflow tag ``collapse_warning``) when, at an evaluation, more than this
    share of the latent groups has collapsed (no active unit; needs ``diagnostics``)."""
    final_iw_samples: int = 8
    """K of the importance-weighted bound in the report written at the end of training."""
    image_every: int = 500
    """Steps between sample/reconstruction grids logged as images (and at the end)."""
    stop_signals: list[Literal["TERM", "INT", "USR1", "USR2", "HUP"]] = field(
        default_factory=lambda: ["TERM", "INT", "USR1"]
    )
    """Signals that stop the run cleanly (``pipeline/stopping.py``): at the next step boundary every
    process stops, a checkpoint of the last completed step is written, the MLflow run is closed as
    KILLED and the process exits with 75; rerunning the same command resumes. TERM is what
    SLURM, Kubernetes and ``kill`` send, INT is Ctrl-C (a second one exits at once, with 130),
    USR1 what ``sbatch --signal=USR1@<seconds>`` sends before the time limit. ``[]``: none."""
    time_limit: str | float = ""
    """Stop the same way once this process has run this long, for clusters that send no signal:
    ``3h50m``, ``90m``, ``45s``, ``1.5h``, or a number of seconds. Leave a margin for the
    checkpoint. Rank 0's clock decides; a process makes at least one step before it is applied.
    Empty: no limit."""
    progress_every: float = 30.0
    """Seconds between plain progress lines (step, loss, images/s, ETA) when neither stderr nor
    stdout is a terminal (a batch job's log file), instead of a progress bar whose carriage
    returns would turn the log into one endless line."""
    rollback_after_nonfinite: int = 0
    """After this many updates in a row with a non-finite gradient norm (each one skipped), roll
    back to the newest checkpoint written before they began: weights, optimizer, EMA, schedule,
    loss scale and step counter, but not the data, which goes on past the batches that diverged
    (PaLM's restart before a loss spike). Must be below ``objective.max_consecutive_skips``, so
    the rollback comes before the stall stop. 0: off (refused under DeepSpeed)."""
    max_rollbacks: int = 3
    """Rollbacks allowed in the whole run (counted in the checkpoints, so across resumes); one
    more needed stops the run with exit 4, its newest checkpoint left as it was."""

    channels_last: bool = True
    """Keep the conv weights, hence the activations, in channels-last (NHWC) memory layout, which
    oneDNN and cuDNN run without converting; the same results up to float rounding. Ignored
    under DeepSpeed (a log line says so)."""
    compile: Literal["none", "cells", "model"] = "none"
    """``torch.compile`` the residual cells (``cells``: a graph per cell shape) or the whole
    model's forward and backward (``model``). Costs compile time at the start of every run
    (``benchmarks/README.md``); ignored under DeepSpeed (a log line says so)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """``torch.compile``'s mode; ``reduce-overhead`` replays CUDA graphs on a GPU."""

    def __post_init__(self) -> None:
        if self.mixed_precision == "auto":
            from pipeline.speed import fastest_precision  # imports torch: only when asked

            self.mixed_precision = fastest_precision()
        if self.compile == "none" and self.compile_mode != "default":
            raise ConfigError(f"train.compile_mode={self.compile_mode!r} needs train.compile=cells or model")
        if not self.run_dir.strip():
            # Path("") is the working directory: checkpoints, mlflow.db and exports would land there.
            raise ConfigError("train.run_dir: must not be empty (every output of the run goes there); "
                              "give a directory, e.g. runs/my-run")
        _check_positive(self, "steps", "grad_accum_steps", "log_every", "eval_every", "image_every",
                        "collective_timeout", "progress_every")  # fmt: skip
        _check_non_negative(self, "eval_batches", "final_iw_samples", "rollback_after_nonfinite", "max_rollbacks")
        if not 0 <= self.collapse_warning_share <= 1:
            raise ConfigError(f"train.collapse_warning_share: must be in [0, 1], got {self.collapse_warning_share}")
        self.time_limit_seconds()  # a malformed limit fails at start, not when it is reached

    def time_limit_seconds(self) -> float | None:
        """``time_limit`` in seconds; None when there is none."""
        if self.time_limit == "":
            return None
        try:
            seconds = parse_duration(self.time_limit)
        except ValueError as err:
            raise ConfigError(f"train.time_limit: {err}") from None
        if seconds <= 0:
            raise ConfigError(f"train.time_limit: must be > 0, got {self.time_limit!r}")
        return seconds


@dataclass
class CheckpointConfig:
    every: int = 200
    """Steps between checkpoints (one is always written at the end)."""
    keep_last: int = 3
    """Newest checkpoints kept; older ones are deleted after a new one is complete."""
    resume_from: str = ""
    """A checkpoint directory (``.../checkpoints/step_000200``, e.g. another run's) to start
    from when ``train.run_dir`` has none of its own: weights, optimizer, EMA, data position.
    Any strategy and number of processes can resume any checkpoint."""

    def __post_init__(self) -> None:
        _check_positive(self, "every", "keep_last")


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow (on the main process only)."""
    tracking_uri: str = ""
    """MLflow tracking URI. Empty: ``$MLFLOW_TRACKING_URI`` if set, else a SQLite store at
    ``<run_dir>/mlflow.db`` with artifacts under ``<run_dir>/mlartifacts``."""
    experiment: str = "hvae"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name; empty: the run directory's name."""
    flush_timeout: float = 60.0
    """Seconds the end of a run waits at most for its tracking spool (``<run_dir>/tracking/``,
    every record logged, kept on disk first) to reach the server; what is left stays in the spool
    for ``pipeline-sync <run_dir>``. Training itself never waits on the server."""
    request_timeout: int = 10
    """Seconds one request to the tracking server may take (``MLFLOW_HTTP_REQUEST_TIMEOUT`` for
    the training process, with MLflow's own retries off: the spool's uploader retries instead)."""
    system_metrics: bool = True
    """Log MLflow's system metrics (``system/...``: CPU, memory, disk, network; GPUs with
    ``nvidia-ml-py`` installed) from the main process's machine."""
    system_metrics_interval: float = 10.0
    """Seconds between two system metric samples."""

    def __post_init__(self) -> None:
        _check_positive(self, "flush_timeout", "request_timeout", "system_metrics_interval")


@dataclass
class FaultsConfig:
    """FOR FAULT TESTS ONLY: faults a run makes on purpose, to show what the pipeline does with
    them (tests/test_nonfinite.py). Empty by default, and then nothing is injected and nothing
    costs anything; never set in a real run."""

    inject_nonfinite_steps: list[int] = field(default_factory=list)
    """Optimizer steps (numbered as in the logs and checkpoints, 1 the first update) whose loss or
    gradient is made non-finite on the ranks of ``inject_ranks``. Each is poisoned the first time
    this process computes it; the same step computed again after a rollback is clean, as after
    a transient fault."""
    inject_ranks: list[int] = field(default_factory=lambda: [0])
    """The processes (ranks) that poison those steps; the others compute their share normally."""
    inject_into: Literal["loss", "gradient"] = "loss"
    """``loss``: the step's loss becomes non-finite, hence every gradient; ``gradient``: the local
    gradient of one parameter, before the all-reduce, while the loss stays finite."""
    inject_value: Literal["nan", "inf"] = "nan"
    """What the poisoned loss or gradient becomes."""
    hold_at_step: int = 0
    """At this step's boundary the trainer waits (every rank, at most 300 s) until a stop is
    requested, then ``hold_seconds`` more, and says so on stderr first: a test's signal then
    lands at a known step however fast or slow the machine (tests/test_signals.py). Only a
    start that trained up to the step holds there: one that resumes at it goes on, so a
    requeued job with the same command does not wait again. 0: never."""
    hold_seconds: float = 0.0
    """How long the hold goes on after the stop request (a second Ctrl-C's window)."""

    def hold(self) -> tuple[int, float] | None:
        """``(step, seconds)`` for pipeline.stopping.StopRequests, or None."""
        return (self.hold_at_step, self.hold_seconds) if self.hold_at_step > 0 else None

    def __post_init__(self) -> None:
        if any(step <= 0 for step in self.inject_nonfinite_steps):
            raise ConfigError(f"faults.inject_nonfinite_steps: steps count from 1, got {self.inject_nonfinite_steps}")
        if any(rank < 0 for rank in self.inject_ranks):
            raise ConfigError(f"faults.inject_ranks: ranks count from 0, got {self.inject_ranks}")
        if self.hold_at_step < 0 or self.hold_seconds < 0:
            raise ConfigError(f"faults.hold_at_step, faults.hold_seconds: not negative, got {self.hold_at_step}, "
                              f"{self.hold_seconds}")  # fmt: skip
        if self.inject_nonfinite_steps and not self.inject_ranks:
            raise ConfigError("faults.inject_ranks: empty, so faults.inject_nonfinite_steps would inject nothing")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def __post_init__(self) -> None:
        rollback, stall = self.train.rollback_after_nonfinite, self.objective.max_consecutive_skips
        if rollback and rollback >= stall:
            raise ConfigError(f"train.rollback_after_nonfinite={rollback}: must be below "
                              f"objective.max_consecutive_skips={stall}, or the stall stop would end the run first")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.steps": 1000, ...}``: the form MLflow params take."""
        return {f"{section}.{key}": value for section, values in self.to_dict().items() for key, value in values.items()}


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([dhms])")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value: str | float) -> float:
    """Seconds in ``"3h50m"``, ``"90m"``, ``"45s"``, ``"1.5h"``, ``"2d"``, or a plain number of
    seconds (a number, or a string of one). A bare number is seconds, never minutes as in SLURM's
    ``--time``: say ``90m``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or _DURATION.sub("", text).strip():
        raise ValueError(f"expected a duration like 3h50m, 90m, 45s or a number of seconds, got {value!r}")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def _check_positive(section: Any, *names: str) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            raise ConfigError(f"{_section_name(section)}.{name}: must be > 0, got {getattr(section, name)}")


def _check_non_negative(section: Any, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 0:
            raise ConfigError(f"{_section_name(section)}.{name}: must be >= 0, got {getattr(section, name)}")


def _section_name(section: Any) -> str:
    return type(section).__name__.removesuffix("Config").lower()


def _unknown_key(path: str, key: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{path}'.{hint} Allowed keys here: {', '.join(allowed)}")


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type; ints are accepted where floats are expected."""
    if isinstance(annotation, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(path, value, option)
            except ConfigError:
                pass
        names = " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(annotation))
        raise ConfigError(f"{path}: expected {names}, got {type(value).__name__} {value!r}")
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        if value is False and "no" in choices:
            value = "no"  # YAML 1.1 reads a bare `no` (train.mixed_precision=no) as false
        if value not in choices:
            raise ConfigError(f"{path}: got {value!r}, allowed values: {', '.join(map(repr, choices))}")
        return value
    if annotation is float:
        return _finite_float(path, value)
    # bool is a subclass of int; `steps: true` must not pass as 1.
    if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")


def _finite_float(path: str, value: Any) -> float:
    """Every float field goes through here: NaN and infinity are refused, since no knob means
    anything with them and each range check (``x <= 0``, ...) is False for NaN, so it would slip
    through to the optimizer or the loader."""
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected float, got bool {value!r}")
    if isinstance(value, str):
        # PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string.
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{path}: expected float, got str {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: expected float, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        value = math.inf
    if not math.isfinite(value):
        raise ConfigError(f"{path}: must be a finite number, got {value}")
    return value


def _build(cls: type, values: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{path}.{key}" if path else key
        if key not in fields:
            raise _unknown_key(full, key, list(fields))
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a section (mapping) with keys {', '.join(f.name for f in dataclasses.fields(annotation))}")
            kwargs[key] = _build(annotation, value, full)
        else:
            kwargs[key] = _coerce(full, value, annotation)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.steps=200"`` -> ``("train.steps", 200)``; the value is read as YAML."""
    import yaml  # here, not at the top: the encoder reads its config from JSON without PyYAML

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}': expected dotted.key=value, e.g. train.steps=200")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({_one_line(err)})") from None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _read_yaml(path: str | Path) -> Any:
    """The parsed file; a missing or unreadable file, or malformed YAML, is a ConfigError naming
    the file (and the line), not a traceback."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a YAML config file (e.g. configs/quickstart.yaml)") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or _one_line(err)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply dotted overrides, validate everything, return the tree."""
    tree: dict[str, Any] = {}
    if path is not None:
        loaded = _read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Validate a nested dict (e.g. the ``config`` saved in a checkpoint) into a Config."""
    try:
        return _build(Config, tree, "")
    except TypeError as err:  # a dataclass constructor rejecting something _build let through
        raise ConfigError(str(err)) from None
