"""FSDP2 (``fully_shard``): every block its own unit, then the root (embeddings, final norm, head).

Parameters are sharded over ``dp_shard × sp`` (sequence-parallel peers hold the same weights and
average their gradients like data-parallel ones); with ``dp_replicate > 1`` the mesh is 2-d and
FSDP2 does HSDP (shard inside, all-reduce across replicas).

Routed experts under expert parallelism are their own FSDP unit on the expert mesh's data-parallel
dims (``dp_replicate × edp``): each rank holds ``E / ep`` experts, replicated over those ranks.
Their gradients already sum the ep group's tokens (the all-to-all's backward brings them home), so
the mean over all data-parallel ranks is the mean over the expert mesh divided by ep: `expert.py`
scales them by 1 / ep (gloo has no pre-multiplied reduction for FSDP's divide factor).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .blocks import blocks
from .config import ParallelOptions
from .mesh import ParallelMesh

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mixed_precision(options: ParallelOptions) -> MixedPrecisionPolicy:
    for field in ("param_dtype", "reduce_dtype"):
        if getattr(options, field) not in DTYPES:
            raise ValueError(f"parallel option {field}={getattr(options, field)!r} is not one of {', '.join(DTYPES)}")
    return MixedPrecisionPolicy(param_dtype=DTYPES[options.param_dtype], reduce_dtype=DTYPES[options.reduce_dtype])


def apply_fsdp(model: nn.Module, pmesh: ParallelMesh, options: ParallelOptions | None = None) -> nn.Module:
    """Shard ``model`` (after tensor / expert parallelism) over the data-parallel ranks. Nothing to
    do in a single data-parallel rank."""
    options = options or ParallelOptions()
    cfg = pmesh.cfg
    dp_ranks = cfg.dp_replicate * cfg.dp_shard * cfg.sp
    if pmesh.mesh is None or dp_ranks == 1:
        return model
    # HSDP: a 2-d (replicate, shard) mesh; slicing the flattened dim from the root is the way
    # torch 2.13 offers to get one.
    mesh = pmesh.mesh["dp_replicate", "dp_shard_sp"] if cfg.dp_replicate > 1 else pmesh.flat["dp_shard_sp"]
    mp = mixed_precision(options)
    expert_mesh = _expert_dp_mesh(pmesh) if cfg.ep > 1 else None
    for block in blocks(model):
        experts = getattr(getattr(block, "ffn", None), "experts", None)
        if expert_mesh is not None and experts is not None:
            # Own unit (even on a 1-rank mesh: the block's unit must not average them over dp);
            # expert.py already scaled their gradients by 1 / ep.
            fully_shard(experts, mesh=expert_mesh, mp_policy=mp, reshard_after_forward=options.reshard_after_forward)
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=options.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=options.reshard_after_forward)
    return model


def _expert_dp_mesh(pmesh: ParallelMesh):
    em = pmesh.expert_mesh
    return em["dp_replicate", "edp"] if pmesh.cfg.dp_replicate > 1 else em["edp"]


@torch.no_grad()
def clip_grad_norm_(model: nn.Module | list[nn.Module], max_norm: float, mesh: ParallelMesh | None = None,
                    norm_type: float = 2.0) -> torch.Tensor:
    """Clip the global gradient norm of ``model``'s parameters, spread over any meshes (FSDP shards,
    TP shards, expert slices); returns the total norm (a plain tensor, the same on every rank).

    Each DTensor gradient contributes its local shard's ``sum |g|^p``, summed over the mesh dims it is
    sharded on (replicated dims count once; expert weights are DTensors sharded over ep, see
    ``expert.py``). Plain tensors (a single process, or replicated) contribute as they are.
    ``mesh`` supplies the pipeline group (stages hold disjoint parameters).
    """
    modules = model if isinstance(model, (list, tuple)) else [model]  # a list: this rank's pipeline stages
    named = [(n, p.grad) for m in modules for n, p in m.named_parameters() if p.grad is not None]
    if not named:
        return torch.zeros(())
    if math.isinf(norm_type) or norm_type <= 0:
        raise ValueError(f"clip_grad_norm_: norm_type={norm_type} is not supported; use a finite p > 0 (2.0)")
    device = named[0][1].device
    buckets: dict = {}  # (mesh id, shard dims) -> [mesh, shard dims, partial sum]
    for name, g in named:
        if isinstance(g, DTensor):
            local, dmesh = g.to_local(), g.device_mesh
            # _StridedShard (FSDP over TP) does not report is_shard(): count anything not replicated
            dims = tuple(i for i, pl in enumerate(g.placements) if not (pl.is_replicate() or pl.is_partial()))
        else:
            local, dmesh, dims = g, None, ()
        key = (id(dmesh), dims)
        bucket = buckets.setdefault(key, [dmesh, dims, torch.zeros((), dtype=torch.float64, device=device)])
        bucket[2] += local.double().abs().pow(norm_type).sum()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for dmesh, dims, partial in buckets.values():
        for d in dims:
            if dmesh.size(d) > 1:
                dist.all_reduce(partial, group=dmesh.get_group(d))
        total += partial
    pp_group = mesh.group("pp") if mesh is not None else None
    if pp_group is not None:  # pipeline stages hold disjoint parameters
        dist.all_reduce(total, group=pp_group)
    total_norm = total.pow(1.0 / norm_type).float()
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for _, g in named:
        g.mul_(coef.to(g.device))
    return total_norm
