"""Expert parallelism wired to the mesh: every MoE layer's routed experts split over the ``ep`` dim
of the expert mesh (ranks that also share data parallelism). Token exchange is the MoE layer's own
all-to-all (``moe.dispatch``); gradients are reduced by FSDP on the expert data-parallel mesh. The
expert weights are DTensors sharded over ep (global shape ``[E, ...]``), used as local slices.

Gradient scale. With loss = mean over the W data-parallel ranks, a rank's expert slice receives the
gradient of its ep group's tokens summed (the all-to-all's backward), and FSDP then averages over
the W / ep ranks holding the same slice: that is ep times the true gradient. The experts' weight
gradients are therefore scaled by 1 / ep at the module boundary (inputs' gradients unchanged).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from torch.distributed.tensor import DTensor, Shard

from ..moe import MoELayer
from .local_shards import shard_parameters
from .mesh import ParallelMesh


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def apply_expert_parallel(model: nn.Module, pmesh: ParallelMesh) -> nn.Module:
    """Keep ``E / ep`` experts per rank in every `MoELayer` (ep = 1: nothing to do). All ranks must
    hold the same full weights when this is called (build from one seed, or load, first)."""
    group = pmesh.group("ep")
    if group is None:
        return model
    ep, ep_mesh = pmesh.cfg.ep, pmesh.submesh("ep")
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.enable_expert_parallel(group)
            experts = module.experts
            # The slices become one DTensor per weight, sharded over ep along the expert dim: its
            # global shape is the full [E, ...], so checkpoints (DCP) and norms see every expert once.
            names = [n for n, _ in experts.named_parameters(recurse=False)]
            shard_parameters(experts, names, ep_mesh, [
                DTensor.from_local(experts._parameters[n].data, ep_mesh, [Shard(0)], run_check=False) for n in names])
            _scale_weight_grads(experts, 1.0 / ep)
    return model


def _scale_weight_grads(experts: nn.Module, factor: float) -> None:
    # y = f(x; W): scaling dL/dy by s scales dL/dW and dL/dx by s; undoing s on x leaves only W's.
    inner = experts.forward

    @functools.wraps(inner)
    def forward(x, *args, **kwargs):
        y = inner(_ScaleGrad.apply(x, 1.0 / factor), *args, **kwargs)
        return _ScaleGrad.apply(y, factor)

    experts.forward = forward
