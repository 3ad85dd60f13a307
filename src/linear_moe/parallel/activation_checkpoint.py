"""Activation checkpointing applied from outside: recompute instead of store.

- ``full``: each block's activations are recomputed in the backward pass (only block inputs are kept);
- ``selective``: only the token mixer of each block is recomputed (its intermediates — projections,
  gates, chunk states — are the bulk at long context), the MoE/MLP activations are kept;
- ``none``.
The module tree and parameter names are unchanged (the forward is wrapped in place), so checkpoints
and FSDP wrapping are unaffected.
"""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "selective", "full")


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return model
    layers = model.layers
    for block in (layers.values() if isinstance(layers, nn.ModuleDict) else layers):  # a pipeline stage: ModuleDict
        target = block if mode == "full" else block.mixer
        _wrap_forward(target)
    return model


def _wrap_forward(module: nn.Module) -> None:
    if getattr(module, "_checkpointed", False):
        return
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not module.training:
            return inner(*args, **kwargs)
        # preserve_rng_state=False: the forward draws no random numbers (no dropout, no router noise), so
        # there is no RNG state to replay; saving it would also make the step uncapturable by CUDA graphs
        return checkpoint(inner, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    module.forward = forward
    module._checkpointed = True
