"""Cumulative log-decays, computed so that exp() is accurate as well as finite.

A chunked form needs sums of log-decays over stretches of time (j, i]. Taking them as differences
of one running sum, G_i - G_j, loses precision: with G ~ -1000 at the chunk end, fp32 keeps only
~1e-4 absolute, and that error becomes a relative error in exp(G_i - G_j). Summing each stretch on
its own (all terms <= 0, so no cancellation) keeps exp() accurate to fp32 rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor


def prefix_sum(g: Tensor, dim: int = -1, exclusive: bool = False) -> Tensor:
    """sum_{s <= i} g_s along dim (exclusive: sum_{s < i})."""
    total = g.cumsum(dim)
    if not exclusive:
        return total
    zero = torch.zeros_like(g.narrow(dim, 0, 1))
    return torch.cat([zero, total.narrow(dim, 0, g.shape[dim] - 1)], dim=dim)


def suffix_sum(g: Tensor, dim: int = -1) -> Tensor:
    """sum_{s > j} g_s along dim: the log-decay from step j to the end of the stretch."""
    return prefix_sum(g.flip(dim), dim, exclusive=True).flip(dim)


def segment_sum(g: Tensor, strict: bool = False) -> Tensor:
    """Pairwise stretch sums over the last dim: `[..., C]` -> `[..., C, C]`.

    out[i, j] = sum_{j < s <= i} g_s for j <= i (strict: sum_{j < s < i} for j < i), and -inf
    elsewhere, so that exp(out) is the causal decay matrix with exact zeros above the diagonal.
    """
    C = g.shape[-1]
    ones = torch.ones(C, C, dtype=torch.bool, device=g.device)
    rows = g.unsqueeze(-1).expand(*g.shape, C)  # rows[s, j] = g_s
    sums = torch.where(ones.tril(-1), rows, torch.zeros_like(rows)).cumsum(-2)  # sum_{j < s <= i}
    if strict:
        sums = torch.cat([torch.zeros_like(sums[..., :1, :]), sums[..., :-1, :]], dim=-2)
    return torch.where(ones.tril(-1 if strict else 0), sums, torch.full_like(sums, float("-inf")))
