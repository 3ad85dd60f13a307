"""Moving rows between token order and expert order with gathers only (no atomics, no zero-filled
accumulators, no host sync).

The routing of ``N`` tokens to ``k`` experts each gives ``N * k`` slots (slot ``t * k + j`` is token ``t``'s
``j``-th choice). ``sort_by_expert`` keeps ``n <= N * k`` of them in expert order: ``order [n]`` (slot of each
sorted row). Its inverse ``slot_to_row [N * k]`` (``inverse_order``) names the sorted row of each slot,
or ``n`` for a dropped slot; the functions below take it as ``[N, k]``. With both maps every step and
its gradient is a gather:

    dispatch  x_sorted = x[token]  (token = order // k)  backward: grad_x[t] = sum_j grad[slot_to_row[t, j]]
    combine   y[t] = sum_j w[t, j] y_sorted[slot_to_row[t, j]]
                                                       backward: grad_y_sorted = w_sorted * grad_y[token]
    permute   v[order] of a one-to-one map             backward: grad[inverse] (zero where nothing came from)

The ``sum_j`` gather is one Triton kernel on CUDA (``kernels.gather_sum``), else gather + sum / bmm.
"""
from __future__ import annotations

import torch

from .swiglu import fused_kernels, use_fused_kernels


def inverse_order(order: torch.Tensor, num_slots: int) -> torch.Tensor:
    """slot_to_row [num_slots] int64: the position of each slot in ``order [n]``, or ``n`` where absent."""
    n = order.numel()
    inv = torch.full((num_slots,), n, dtype=torch.long, device=order.device)
    return inv.scatter_(0, order, torch.arange(n, device=order.device))


def gather_sum(src: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = sum_j weight[t, j] * src[index[t, j]]``; index values ``>= len(src)`` add zero. No autograd.

    src [n, C], index [N, k] int64, weight [N, k] or None -> [N, C] in src's dtype (accumulated in fp32 on the
    Triton path, in bf16/fp16 sum or bmm otherwise).
    """
    if use_fused_kernels(src):
        return fused_kernels().gather_sum(src, index, weight)
    n_tok, k = index.shape
    if src.shape[0] < index.numel():  # some slots may be dropped: they read an appended zero row
        src = torch.cat([src, src.new_zeros((1,) + tuple(src.shape[1:]))])
    rows = src.index_select(0, index.reshape(-1)).view(n_tok, k, -1)
    if weight is None:
        return rows.sum(1)
    return torch.bmm(weight.to(src.dtype).unsqueeze(1), rows).squeeze(1)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token, slot_to_row):
        ctx.save_for_backward(slot_to_row)
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        (slot_to_row,) = ctx.saved_tensors
        return gather_sum(grad, slot_to_row), None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, slot_weight, token, slot_to_row):
        # the weight's gradient needs y_sorted: only kept when a weight is given
        ctx.save_for_backward(token, slot_to_row, slot_weight, y_sorted if slot_weight is not None else None)
        return gather_sum(y_sorted, slot_to_row, slot_weight)

    @staticmethod
    def backward(ctx, grad):
        token, slot_to_row, slot_weight, y_sorted = ctx.saved_tensors
        grad_rows = grad.index_select(0, token)                                  # [n, C]
        grad_weight = None
        if slot_weight is not None:
            acc = torch.promote_types(grad_rows.dtype, torch.float32)          # fp32 at least, float64 stays
            dw = (grad_rows.to(acc) * y_sorted.to(acc)).sum(-1)                # per sorted row
            padded = torch.cat([dw, dw.new_zeros(1)])
            grad_weight = padded[slot_to_row].to(slot_weight.dtype)
            row_weight = slot_weight.reshape(-1)[_order_of(slot_to_row, grad_rows.shape[0])]
            grad_rows = grad_rows * row_weight.to(grad_rows.dtype).unsqueeze(-1)
        return grad_rows, grad_weight, None, None


def _order_of(slot_to_row: torch.Tensor, n: int) -> torch.Tensor:
    # the slot of each sorted row: the inverse of slot_to_row on the kept slots (dropped slots land on row n)
    order = torch.empty(n + 1, dtype=torch.long, device=slot_to_row.device)
    return order.scatter_(0, slot_to_row.reshape(-1), torch.arange(slot_to_row.numel(), device=slot_to_row.device))[:n]


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, index, inverse):
        ctx.save_for_backward(inverse)
        ctx.n = index.numel()
        return v.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        if ctx.n < inverse.numel():  # rows of v that were not picked get zero
            grad = torch.cat([grad, grad.new_zeros((1,) + tuple(grad.shape[1:]))])
        return grad.index_select(0, inverse), None, None


def dispatch(x: torch.Tensor, token: torch.Tensor, slot_to_row: torch.Tensor) -> torch.Tensor:
    """Token rows in expert order: x [N, C], token [n] (= order // k), slot_to_row [N, k] -> x[token] [n, C].

    Backward sums each token's ``k`` row gradients by gathering them (no index_add_ atomics).
    """
    return _Dispatch.apply(x, token, slot_to_row)


def combine(y_sorted: torch.Tensor, token: torch.Tensor, slot_to_row: torch.Tensor,
            slot_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum each token's expert rows back: y_sorted [n, C], token [n], slot_to_row [N, k] -> [N, C].

    ``slot_weight [N, k]`` (routing weights in slot order) multiplies the rows; leave it None when the
    experts already applied it. Dropped slots (``slot_to_row == n``) add zero. No zero-filled accumulator.
    """
    return _Combine.apply(y_sorted, slot_weight, token, slot_to_row)


def permute(v: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``v[index]`` for a one-to-one ``index [n]`` into ``v [m, ...]`` whose ``inverse [m]`` holds each row's
    position in ``index`` (``n`` for rows not picked, e.g. from ``inverse_order``). Backward is ``grad[inverse]``."""
    return _Permute.apply(v, index, inverse)
