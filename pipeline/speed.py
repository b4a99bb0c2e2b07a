"""How the training step runs fast: the weights' memory layout, compilation, AdamW's kernels,
and which autocast precision ``train.mixed_precision=auto`` picks.

The layout, compilation and AdamW's kernels change how the step is computed, not what: the
loss and the weights after a step match the plain eager float32 step within the tolerances
tests/test_speed_options.py checks (bitwise for the AdamW implementations, float32 rounding for
the memory layout and compilation). bf16 autocast changes the arithmetic of the convolutions;
the same tests bound how far its losses move. benchmarks/train_step.py measures what each one
is worth; benchmarks/README.md has the numbers.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline.config import OptimConfig, TrainConfig
from pipeline.distributed import has_accelerator
from pipeline.model.blocks import ResidualBlock

log = logging.getLogger(__name__)


def fastest_precision() -> str:
    """What ``train.mixed_precision=auto`` becomes here (TrainConfig says what it rests on): bf16
    on a CPU-only machine whose cores have AMX tiles, else float32."""
    if has_accelerator():
        return "no"
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)  # private: may go away
    return "bf16" if has_amx() else "no"


def prepare_model(model: nn.Module, train: TrainConfig, deepspeed: bool = False) -> nn.Module:
    """Applies ``train.channels_last`` and ``train.compile`` in place (before
    ``accelerator.prepare``); the parameter names, hence checkpoints, stay the same."""
    if deepspeed and (train.channels_last or train.compile != "none"):
        # ZeRO flattens the weights into its own contiguous buffers (undoing the layout) and
        # hooks every module's forward, which compiled modules would trace through.
        log.info("under DeepSpeed the weights stay contiguous and uncompiled (train.channels_last=%s and "
                 "train.compile=%s have no effect)", train.channels_last, train.compile)
        return model
    if train.channels_last:
        # oneDNN (CPU) and cuDNN keep a channels-last conv's output channels-last, so the
        # whole network follows the weights without converting the input images.
        model.to(memory_format=torch.channels_last)
    if train.compile == "cells":
        # Graphs of the residual cells alone (shared by cells of one shape): what is between
        # them (the heads' distributions, the likelihood) stays eager, with no graph breaks to
        # find there. Measured slower than eager on a CPU (benchmarks/README.md).
        for module in model.modules():
            if isinstance(module, ResidualBlock):
                module.compile(mode=train.compile_mode)
    elif train.compile == "model":
        from torch._inductor import config as inductor_config

        # The latent noise from torch's generator as in eager mode, not inductor's own: the same
        # numbers compiled or not, so the option changes no result beyond rounding.
        inductor_config.fallback_random = True
        model.compile(mode=train.compile_mode)
    return model


def make_optimizer(parameters, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with the kernels ``optim.implementation`` names."""
    kernels = {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    optimizer = torch.optim.AdamW(
        parameters,
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        weight_decay=optim.weight_decay,
        **kernels[optim.implementation],
    )
    optimizer.register_load_state_dict_post_hook(state_laid_out_like_parameters)
    return optimizer


def state_laid_out_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Gives every loaded moment its parameter's memory layout. Checkpoints hold contiguous
    tensors; fused AdamW walks a parameter, its gradient and its moments in memory order, so a
    contiguous moment beside a channels-last weight would be applied to the wrong elements."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)
