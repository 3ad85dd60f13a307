"""Tensor parallelism: DTensor ``parallelize_module`` plans over the ``tp`` mesh, applied per block.

Megatron's split, heads over ranks: the input projections are column-parallel (each rank computes
its heads), the output projection is row-parallel (partial sums all-reduced). Linear mixers keep
one state per head, so a head's whole recurrence lives on one rank and needs no communication.
The dense SwiGLU MLP is split the same way over its hidden units. Residual stream, norms,
embeddings, LM head and the MoE layers stay replicated over tp (MoE scales with ep instead).

A mixer's code reads its head counts (``num_heads``, ``num_kv_heads``) to reshape; the plan divides
them by tp so the same code runs on its local heads. Per-head-shared parameters that see only the
local heads (the output norm's weight) are made replicated DTensors, so their gradients are summed
over tp by DTensor itself.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel, PrepareModuleInput, PrepareModuleOutput, RowwiseParallel, parallelize_module,
)

from .blocks import blocks

# token mixer -> the projections split over heads (column-parallel); "o_proj" is row-parallel.
MIXER_PLANS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj"),
    "gla": ("q_proj", "k_proj", "v_proj", "gk_proj.1", "g_proj"),
    "linear_attention": ("q_proj", "k_proj", "v_proj"),
}


def tensor_parallel_mixers() -> list[str]:
    """The token mixers `apply_tensor_parallel` can split."""
    return sorted(MIXER_PLANS)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh | None) -> nn.Module:
    """Split every block's token mixer and dense MLP over ``tp_mesh`` (None: nothing to do).
    Raises ValueError for a mixer without a plan or head counts tp does not divide."""
    if tp_mesh is None or tp_mesh.size() == 1:
        return model
    tp = tp_mesh.size()
    for i, block in enumerate(blocks(model)):
        _parallelize_mixer(block.mixer, getattr(block, "mixer_name", ""), tp_mesh, tp, i)
        if not getattr(block, "is_moe", False):
            parallelize_module(block.ffn, tp_mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                                    "down_proj": RowwiseParallel()})
    return model


def _parallelize_mixer(mixer: nn.Module, name: str, mesh: DeviceMesh, tp: int, layer: int) -> None:
    if name not in MIXER_PLANS:
        raise ValueError(f"layer {layer}: token mixer {name!r} has no tensor-parallel plan; with parallel.tp={tp} "
                         f"use one of: {', '.join(tensor_parallel_mixers())} (or tp=1)")
    heads = mixer.num_heads
    kv_heads = getattr(mixer, "num_kv_heads", heads) or heads
    if heads % tp or kv_heads % tp:
        raise ValueError(f"layer {layer}: parallel.tp={tp} must divide the {name} mixer's num_heads={heads} "
                         f"and num_kv_heads={kv_heads}")
    plan = {proj: ColwiseParallel() for proj in MIXER_PLANS[name] if _has(mixer, proj)}
    plan["o_proj"] = RowwiseParallel()
    parallelize_module(mixer, mesh, plan)
    mixer.num_heads = heads // tp
    if hasattr(mixer, "num_kv_heads"):
        mixer.num_kv_heads = kv_heads // tp
    norm = getattr(mixer, "out_norm", None)
    if norm is not None and any(True for _ in norm.parameters()):
        _replicate_head_shared(norm, mesh, gated=getattr(mixer, "g_proj", None) is not None)


def _replicate_head_shared(norm: nn.Module, mesh: DeviceMesh, gated: bool) -> None:
    """Run the per-head output norm on DTensors: heads sharded (dim 2), weights replicated, so the
    weights' gradients (partial over heads) are summed across tp."""
    distribute_module(norm, mesh, lambda _name, mod, _mesh: [
        mod.register_parameter(n, nn.Parameter(distribute_tensor(p.data, _mesh, [Replicate()])))
        for n, p in list(mod.named_parameters(recurse=False))])
    layouts = (Shard(2), Shard(2)) if gated else (Shard(2),)
    parallelize_module(norm, mesh, PrepareModuleInput(input_layouts=layouts, desired_input_layouts=layouts))
    parallelize_module(norm, mesh, PrepareModuleOutput(output_layouts=Shard(2), desired_output_layouts=Shard(2)))


def _has(module: nn.Module, path: str) -> bool:
    try:
        return module.get_submodule(path) is not None
    except AttributeError:
        return False
