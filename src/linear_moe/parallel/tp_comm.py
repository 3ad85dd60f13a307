"""The collectives at the edges of tensor-parallel regions, as autograd functions (Megatron's f / g).

A tensor-parallel region (a token mixer, the dense MLP) computes on plain local tensors: each rank
holds some heads (or hidden units) and produces a *partial* output that sums to the full one over
the ``tp`` group. Its edges:

* `copy_to_tp`: identity forward; all-reduce of the gradient backward (every rank's heads read the
  same input, each contributes part of its gradient);
* `reduce_from_tp`: all-reduce forward (partial -> full); identity backward.

With sequence parallelism (the residual stream split over time between blocks) the same edges are
`gather_seq` (all-gather over time; backward reduce-scatter) and `reduce_scatter_seq` (reduce-scatter
over time; backward all-gather). A region that stays replicated under sequence parallelism (the MoE
layer) is entered by `gather_seq_replicated` (all-gather; backward keeps this rank's slice: every
rank already holds the full gradient) and left by `split_seq` (this rank's slice; backward all-gather).

`all_reduce_sum` (sum forward and backward) serves norms whose width is split over ranks, and
`grad_all_reduce` (identity forward, all-reduce backward) replicated parameters used on local heads.
Shapes: time is ``dim`` (1 for ``[batch, time, hidden]``); rank r holds time slice r of ``tp``.
Gloo has no reduce-scatter: it is an all-reduce plus a slice there (same sum, more bytes).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _all_reduce(x: Tensor, group) -> Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: Tensor, dim: int, group) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _slice(x: Tensor, dim: int, group) -> Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % size:
        raise ValueError(f"sequence parallelism: length {x.shape[dim]} along dim {dim} is not divisible by tp={size}")
    return x.chunk(size, dim)[rank].contiguous()


def _reduce_scatter(x: Tensor, dim: int, group) -> Tensor:
    if dist.get_backend(group) == "nccl" and dim == 0:
        size = dist.get_world_size(group)
        out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
        dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
        return out
    if dist.get_backend(group) == "nccl":
        moved = x.movedim(dim, 0)
        return _reduce_scatter(moved, 0, group).movedim(0, dim).contiguous()
    return _slice(_all_reduce(x, group), dim, group)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, grad_is_partial):
        ctx.dim, ctx.group, ctx.partial = dim, group, grad_is_partial
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial:
            return _reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return _slice(grad, ctx.dim, ctx.group), None, None, None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, reduce):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group) if reduce else _slice(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def copy_to_tp(x: Tensor, group) -> Tensor:
    """Enter a tensor-parallel region: identity; the gradient is all-reduced over ``group``."""
    return _CopyToTP.apply(x, group)


def grad_all_reduce(p: Tensor, group) -> Tensor:
    """A replicated parameter used on this rank's heads only: identity; its gradient (partial) is
    all-reduced over ``group``."""
    return _CopyToTP.apply(p, group)


def reduce_from_tp(x: Tensor, group) -> Tensor:
    """Leave a tensor-parallel region: the partial outputs summed over ``group``; identity backward."""
    return _ReduceFromTP.apply(x, group)


def all_reduce_sum(x: Tensor, group) -> Tensor:
    """``Σ_ranks x`` where every rank's result feeds on: forward and backward are both all-reduces."""
    return _AllReduceSum.apply(x, group)


def gather_seq(x: Tensor, group, dim: int = 1) -> Tensor:
    """Sequence-parallel entry of a tensor-parallel region: all-gather over time; backward reduce-scatter."""
    return _GatherSeq.apply(x, dim, group, True)


def gather_seq_replicated(x: Tensor, group, dim: int = 1) -> Tensor:
    """Entry of a region every rank computes whole: all-gather; backward keeps this rank's slice."""
    return _GatherSeq.apply(x, dim, group, False)


def reduce_scatter_seq(x: Tensor, group, dim: int = 1) -> Tensor:
    """Sequence-parallel exit of a tensor-parallel region: partial outputs summed, this rank's time slice
    kept; backward all-gather."""
    return _ScatterSeq.apply(x, dim, group, True)


def split_seq(x: Tensor, group, dim: int = 1) -> Tensor:
    """This rank's time slice of a replicated tensor; backward all-gather."""
    return _ScatterSeq.apply(x, dim, group, False)


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Identity forward; the gradient times ``factor`` (a value every tp rank computes and adds to its
    loss, e.g. a router's balance loss, counts once after the gradients are summed over tp)."""
    return _ScaleGrad.apply(x, factor)
