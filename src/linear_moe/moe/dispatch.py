"""Token dispatch: sort routing choices by expert (with optional capacity dropping) and, under expert
parallelism, send them to the rank that owns the expert with ``all_to_all_single`` and back.

Expert parallelism layout: ``E`` experts over an ``ep`` group of size ``P``; rank ``r`` owns experts
``[r * E/P, (r+1) * E/P)``. Each rank routes its own tokens; because the tokens are sorted by global
expert id, the rows bound for each rank are one contiguous chunk.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .permute import permute
from .router import expert_counts


def sort_by_expert(topk_idx: torch.Tensor, num_experts: int, capacity: int | None = None):
    """Order the ``N * k`` routing choices by expert.

    topk_idx [N, k] -> (order [n_kept] indices into ``topk_idx.reshape(-1)``, counts [E] kept per expert,
    num_dropped scalar tensor). Within an expert, choices keep token order (stable sort), which is the
    drop priority: with ``capacity`` each expert keeps its first ``capacity`` tokens in flattened
    ``[batch, time]`` order and drops the rest. Dropless needs no host sync; with capacity the kept
    count is data dependent, so the boolean select syncs once.
    """
    flat = topk_idx.reshape(-1)
    order = torch.argsort(_narrow_keys(flat, num_experts), stable=True)
    counts = expert_counts(flat, num_experts)
    if capacity is None:
        return order, counts, torch.zeros((), dtype=torch.long, device=flat.device)
    start = torch.cumsum(counts, 0) - counts
    position = torch.arange(flat.numel(), device=flat.device) - start[flat[order]]
    keep = position < capacity
    return order[keep], counts.clamp(max=capacity), (~keep).sum()


def _narrow_keys(ids: torch.Tensor, bound: int) -> torch.Tensor:
    """Integer ids in ``[0, bound)`` as the narrowest sort key that holds them: a radix sort passes once per key
    byte (int64 expert ids took 8 passes and ~20 small kernels per layer on the GPU; uint8 takes one)."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if bound <= torch.iinfo(dtype).max + 1:
            return ids.to(dtype)
    return ids


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits whose backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable ``all_to_all_single``: send ``in_splits[j]`` rows of ``x [n, ...]`` to rank j and
    receive ``out_splits[j]`` rows from it -> ``[sum(out_splits), ...]``."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def expert_parallel_apply(x_sorted: torch.Tensor, counts: torch.Tensor, group,
                          local_experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run sorted rows through experts sharded over ``group`` and bring the results home.

    x_sorted [n, C] sorted by global expert id, counts [E] rows per global expert (this rank's tokens),
    ``local_experts(x [m, C] sorted by local expert, local_counts [E/P]) -> [m, C]``. Returns [n, C]
    aligned with ``x_sorted``. One host sync: the split sizes must be Python ints.
    """
    world = dist.get_world_size(group)
    e_local = counts.numel() // world
    recv_counts = torch.empty_like(counts)
    # recv_counts.view(P, E/P)[s, j]: rows source rank s sends for my local expert j.
    dist.all_to_all_single(recv_counts, counts.contiguous(), group=group)
    send_splits = counts.view(world, e_local).sum(1).tolist()
    recv_splits = recv_counts.view(world, e_local).sum(1).tolist()
    x_recv = all_to_all(x_sorted, recv_splits, send_splits, group)   # [m, C], by source rank then local expert
    local_ids = torch.arange(e_local, device=counts.device).repeat(world)
    row_expert = torch.repeat_interleave(local_ids, recv_counts, output_size=x_recv.shape[0])
    perm = torch.argsort(_narrow_keys(row_expert, e_local), stable=True)  # regroup by local expert
    inv_perm = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
    # one-to-one regrouping: gathers both ways (index backward would scatter with atomics)
    y_local = local_experts(permute(x_recv, perm, inv_perm), recv_counts.view(world, e_local).sum(0))
    y_recv = permute(y_local, inv_perm, perm)
    return all_to_all(y_recv, send_splits, recv_splits, group)
