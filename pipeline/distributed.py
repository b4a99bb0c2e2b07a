"""How the processes of a run are wired: the Accelerator, from the training config and the launcher.

Two sources describe a run, and each knob lives in exactly one of them:

* the training config (``configs/*.yaml``) says *what* is trained: micro-batch size, gradient
  accumulation, clipping, precision;
* the launcher (``accelerate launch --config_file configs/accelerate/<strategy>.yaml``) says
  *how* it is spread: how many processes and machines, DDP or DeepSpeed, the ZeRO stage,
  offloading.

DeepSpeed wants both in one JSON config. We build it here, from the training config plus the
ZeRO settings the launcher exported, rather than keeping a DeepSpeed JSON per preset whose
batch size or precision would drift from the training config. A launcher file that sets one of
the training knobs anyway (``gradient_accumulation_steps: 4`` in an accelerate config, say) is
accepted when it agrees and refused at start when it does not, naming both values.

On a machine without a GPU, multi-process runs use gloo: Accelerate's DDP needs ``cpu=True``
for that, and its DeepSpeed path needs the backend named, or each process silently trains alone.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import torch

from pipeline.config import Config, ConfigError

# What Accelerate's launcher exports for DeepSpeed, and the training-config key each duplicates.
_DUPLICATED = {
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": ("gradient_accumulation_steps", "train.grad_accum_steps"),
    "ACCELERATE_GRADIENT_CLIPPING": ("gradient_clipping", "optim.grad_clip"),
}


_TRAINING_KEY = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "train_batch_size": "data.batch_size x train.grad_accum_steps x processes",
    "gradient_clipping": "optim.grad_clip",
}


def using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def has_accelerator() -> bool:
    """A GPU (or another device torch can train on) is present."""
    return torch.accelerator.is_available()


def deepspeed_config(cfg: Config, world_size: int, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The DeepSpeed config of this run: training knobs from ``cfg``, ZeRO knobs from the launcher.

    Raises ConfigError when the launcher (its exported variables, or the JSON file its
    ``deepspeed_config_file`` names) contradicts the training config.
    """
    env = os.environ if environ is None else environ
    precision = cfg.train.mixed_precision
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        # loss_scale 0: dynamic loss scaling; an overflow step is skipped and the scale halved.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }
    for variable, (ds_key, cfg_key) in _DUPLICATED.items():
        if variable in env:  # exported only when an accelerate config or flag set it
            _agree(ds_key, float(env[variable]), derived[ds_key], cfg_key, "the accelerate config")
    zero: dict[str, Any] = {"stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}
    for device_key, variable in (("offload_optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
                                 ("offload_param", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")):  # fmt: skip
        if env.get(variable, "none") != "none":
            zero[device_key] = {"device": env[variable]}
    config = {**derived, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
              "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}  # fmt: skip
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        config = _merge_file(config, env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
    return config


def _agree(ds_key: str, theirs: Any, ours: Any, cfg_key: str, where: str) -> None:
    if theirs == "auto":
        return
    if float(theirs) != float(ours):
        raise ConfigError(
            f"{where} sets DeepSpeed's {ds_key}={theirs} but {cfg_key}={ours}: this knob belongs to the training "
            f"config, from which the DeepSpeed config is derived; remove it from {where} (or make them agree)"
        )


def _merge_file(config: dict[str, Any], path: str) -> dict[str, Any]:
    """A user's DeepSpeed JSON: its own settings are kept, its copies of training knobs must agree."""
    with open(path) as f:
        theirs = json.load(f)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping"):
        if key in theirs:
            _agree(key, theirs[key], config[key], _TRAINING_KEY[key], path)
    for key in ("bf16", "fp16"):
        enabled = theirs.get(key, {}).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != config[key]["enabled"]:
            raise ConfigError(f"{path} sets {key}.enabled={enabled} but train.mixed_precision says otherwise: "
                              "precision belongs to the training config")  # fmt: skip
    merged = {**theirs, **{k: v for k, v in config.items() if k not in ("zero_optimization", "bf16", "fp16")}}
    merged["zero_optimization"] = {**config["zero_optimization"], **theirs.get("zero_optimization", {})}
    for key in ("bf16", "fp16"):
        merged[key] = {**theirs.get(key, {}), **config[key]}
    return merged


def check_launcher_precision(cfg: Config, environ: dict[str, str] | None = None) -> None:
    """``accelerate launch --mixed_precision X`` with X other than the config's is refused: one
    of the two would silently lose. (The launcher always exports a value; "no" is its default
    and is taken to mean "not said".)"""
    env = os.environ if environ is None else environ
    launcher = env.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher not in ("no", cfg.train.mixed_precision):
        raise ConfigError(
            f"the launcher asks for mixed_precision={launcher!r} but train.mixed_precision={cfg.train.mixed_precision!r}; "
            "set it in the training config (train.mixed_precision=...) and drop it from the launcher"
        )


def make_accelerator(cfg: Config):
    """The Accelerator for this process, DDP or DeepSpeed as launched, gloo where there is no GPU."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    check_launcher_precision(cfg)
    timeout = datetime.timedelta(seconds=cfg.train.collective_timeout)
    handlers = [InitProcessGroupKwargs(timeout=timeout)]
    if not using_deepspeed():
        return Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum_steps,
            cpu=not has_accelerator(),
            kwargs_handlers=handlers,
        )
    if cfg.objective.skip_threshold > 0:
        raise ConfigError(
            "objective.skip_threshold > 0 under DeepSpeed: its engine clips and steps in one call, so an update cannot "
            "be skipped for a large (finite) norm; non-finite ones are still skipped. Set objective.skip_threshold=0, "
            "or train with DDP"
        )
    if cfg.train.rollback_after_nonfinite > 0:
        raise ConfigError(
            "train.rollback_after_nonfinite > 0 under DeepSpeed: putting a checkpoint back into a running engine's "
            "partitions is not done; non-finite updates are still skipped and counted. Set it to 0, or train with DDP"
        )
    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true":
        raise ConfigError("DeepSpeed with use_cpu/--cpu: Accelerate would silently drop DeepSpeed. Leave use_cpu out; "
                          "without a GPU the pipeline runs DeepSpeed over gloo by itself")  # fmt: skip
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = deepspeed_config(cfg, world_size)
    # Accelerate refuses a DeepSpeed config object when its launcher also exported ZeRO fields,
    # because one would override the other. deepspeed_config() has merged and checked both.
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
    if not has_accelerator():
        handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
    )


# --- the full training state, whatever the strategy ------------------------------------------
#
# Checkpoints hold full tensors keyed by parameter name (checkpoint.PortableOptimizerState).
# Under DDP every process has them; under ZeRO each holds a partition, and DeepSpeed's
# safe_get/set_full_* calls gather or scatter one parameter at a time. They are collectives:
# every process calls these functions, in the same order.


def is_deepspeed(model: torch.nn.Module) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def zero_stage(model: torch.nn.Module) -> int:
    return model.zero_optimization_stage() if is_deepspeed(model) else 0


def full_training_state(accelerator, model, optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """(model weights in float32 where DeepSpeed keeps float32 masters, optimizer state by name)."""
    from pipeline.checkpoint import PortableOptimizerState, portable_from_torch

    module = accelerator.unwrap_model(model)
    names = [name for name, _ in module.named_parameters()]
    if not is_deepspeed(model):
        return module.state_dict(), portable_from_torch(optimizer.state_dict(), names)
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    weights, tensors = {}, {}
    for name, param in module.named_parameters():
        weights[name] = safe_get_full_fp32_param(param).cpu()
        tensors[name] = {key: safe_get_full_optimizer_state(param, key).cpu() for key in ("exp_avg", "exp_avg_sq")}
    saved = module.state_dict().keys()  # persistent buffers only, as a plain state_dict has
    weights |= {name: buffer.cpu() for name, buffer in module.named_buffers() if name in saved}
    base = _base_optimizer(model)
    (group,) = base.param_groups  # the trainer builds one group; more would need a name map
    hyper = {k: v for k, v in group.items() if k != "params"}
    step = max((int(s["step"]) for s in base.state.values() if "step" in s), default=0)
    return weights, PortableOptimizerState(tensors, step, [{**hyper, "params": names}])


def load_optimizer_state(accelerator, model, optimizer, portable) -> None:
    """Put a by-name optimizer state into the prepared optimizer (the weights went into the
    model before ``prepare``, so that DeepSpeed built its masters and partitions from them)."""
    from pipeline.checkpoint import torch_from_portable

    module = accelerator.unwrap_model(model)
    names = [name for name, _ in module.named_parameters()]
    missing = set(names) ^ set(portable.tensors) if portable.tensors else set()
    if missing:
        raise ValueError(f"the checkpoint's optimizer state does not fit the model: {sorted(missing)[:5]}")
    if not is_deepspeed(model):
        optimizer.load_state_dict(torch_from_portable(portable, names))
        return
    if not portable.tensors:  # saved before the first update: nothing to restore
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    base, zero = _base_optimizer(model), model.optimizer
    # Adam's moments exist only after a first step; create them (zeros) so they can be set.
    # (ZeRO-3 keys them by its flat float32 partitions, ZeRO-1/2 by the groups' parameters.)
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or [p for g in base.param_groups for p in g["params"]]
    for flat in flats:
        state = base.state[flat]
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(flat)
        state["step"] = torch.tensor(float(portable.step))
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link moments to parameters
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for name, param in module.named_parameters():
        for key, value in portable.tensors[name].items():
            safe_set_full_optimizer_state(param, value.to(accelerator.device), key)
    (group,) = base.param_groups
    group.update({k: v for k, v in portable.param_groups[0].items() if k != "params"})


def _base_optimizer(model) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO wrapper (it steps the float32 partitions)."""
    return model.optimizer.optimizer
