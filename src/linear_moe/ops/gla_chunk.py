"""Chunked gated linear attention in pure PyTorch (differentiable by autograd).

Within a chunk of C steps, with cumulative log-decay G_i = sum_{s<=i} g_s from the chunk start,

    o_i = q_i exp(G_i) S_0  +  sum_{j<=i} (q_i * exp(G_i - G_j)) . k_j  v_j
    S_C = exp(G_C) S_0       +  sum_j (k_j * exp(G_C - G_j))^T v_j

(with a bonus u, o_i reads the state before step i: G_i -> G_{i-1} on the query side, the sum runs
over j < i and gains the diagonal term (q_i . u k_i) v_i).

Numerical stability: every exponent that is evaluated is a sum of log-decays over a stretch of
time, so it is <= 0 and exp() never overflows in fp32 however strong the decays are; each stretch
is summed on its own (`_decay.py`) rather than as a difference of running sums, so exp() is also
accurate. For a scalar decay the pairwise factor exp(G_i - G_j) is a `[C, C]` matrix. For a vector
decay it would be `[C, C, K]`; we only build that inside small diagonal sub-chunks, and between
sub-chunks b < a go through the last step r of the sub-chunk before a as a reference point:
q_i exp(G_i - G_r) and k_j exp(G_r - G_j) are both bounded by |q_i| and |k_j|.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._chunk_scan import scan_chunks
from ._decay import prefix_sum, segment_sum, suffix_sum
from ._varlen import Packing


def to_chunks(x: Tensor, chunk_size: int) -> Tensor:
    """`[B, T, H, *rest]` (T a multiple of chunk_size) -> `[B, H, N, C, *rest]`."""
    b, t, h = x.shape[:3]
    x = x.reshape(b, t // chunk_size, chunk_size, h, *x.shape[3:])
    return x.movedim(3, 1)


def from_chunks(x: Tensor) -> Tensor:
    """`[B, H, N, C, *rest]` -> `[B, T, H, *rest]`."""
    b, h, n, c = x.shape[:4]
    return x.movedim(1, 3).reshape(b, n * c, h, *x.shape[4:])


def pad_time(x: Tensor | None, multiple: int) -> Tensor | None:
    """Zero-pad dim 1 (time) up to a multiple (zeros are identity steps for every recurrence)."""
    if x is None or x.shape[1] % multiple == 0:
        return x
    pad = multiple - x.shape[1] % multiple
    return torch.cat([x, x.new_zeros((x.shape[0], pad, *x.shape[2:]))], dim=1)


def sub_chunk_size(chunk_size: int) -> int:
    """Largest divisor d of C with d*d <= C: balances the [d, d, K] diagonal blocks against the
    C/d reference-point copies of k between sub-chunks."""
    return max(d for d in range(1, chunk_size + 1) if chunk_size % d == 0 and d * d <= chunk_size)


def _causal_mask(n: int, strict: bool, device: torch.device) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def gla_chunk_transition(k: Tensor, v: Tensor, g: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-chunk affine state map. k `[B,H,N,C,K]`, v `[B,H,N,C,V]`, g None, `[B,H,N,C]` or
    `[B,H,N,C,K]`. Returns (trans `[B,H,N,K]` or `[B,H,N,1]` = exp(G_C), incr `[B,H,N,K,V]`)."""
    if g is None:
        return k.new_ones(k.shape[:3] + (1,)), k.transpose(-1, -2) @ v
    if g.dim() == 5:
        return g.sum(-2).exp(), (k * suffix_sum(g, -2).exp()).transpose(-1, -2) @ v
    k_to_end = k * suffix_sum(g, -1).exp().unsqueeze(-1)
    return g.sum(-1, keepdim=True).exp(), k_to_end.transpose(-1, -2) @ v


def _intra_vector(q: Tensor, k: Tensor, g: Tensor, strict: bool) -> Tensor:
    """A_ij = sum_K q_i k_j exp(G_i - G_j) for j <= i (j < i, G_i -> G_{i-1} when strict): `[..., C, C]`."""
    *lead, C, K = q.shape
    d = sub_chunk_size(C)
    ns = C // d
    qs, ks, gs = (x.reshape(*lead, ns, d, K) for x in (q, k, g))
    # Inside each sub-chunk: the full [d, d, K] pairwise decay.
    pair = segment_sum(gs.transpose(-1, -2), strict).exp().movedim(-3, -1)  # [..., ns, i, j, K]
    diag = (qs.unsqueeze(-2) * pair * ks.unsqueeze(-3)).sum(-1)  # [..., ns, i, j]
    eye = torch.eye(ns, dtype=q.dtype, device=q.device)
    A = diag.unsqueeze(-2) * eye[:, None, :, None]  # [..., a, i, b, j], zero off the diagonal
    if ns > 1:
        # Between sub-chunks b < a, through the reference point r_a = last step of sub-chunk a-1:
        # decay(j -> i) = decay(r_a -> i) * decay(j -> r_a), each factor <= 1.
        q_ref = qs * prefix_sum(gs, -2, exclusive=strict).exp()  # [..., a, i, K]
        between = segment_sum(gs.sum(-2).transpose(-1, -2), strict=True).movedim(-3, -1)  # [..., a, b, K]
        to_ref = between.unsqueeze(-2) + suffix_sum(gs, -2).unsqueeze(-4)  # [..., a, b, j, K]
        A = A + torch.einsum("...aik,...abjk->...aibj", q_ref, ks.unsqueeze(-4) * to_ref.exp())
    return A.reshape(*lead, C, C)


def gla_chunk_pieces(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, bonus: Tensor | None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All chunks at once, each as if it started from a zero state.

    Args (chunked layout): q (already scaled), k `[B,H,N,C,K]`; v `[B,H,N,C,V]`; g None,
        `[B,H,N,C]` (scalar) or `[B,H,N,C,K]` (vector); bonus None or `[H, K]`.
    Returns:
        o_zero `[B,H,N,C,V]`: output with a zero state at every chunk start;
        q_eff `[B,H,N,C,K]`: the output is o_zero + q_eff @ S_start;
        trans, incr: the chunk's state map (see `gla_chunk_transition`).
    """
    strict = bonus is not None
    if g is None:
        A = q @ k.transpose(-1, -2)
        A = A.masked_fill(~_causal_mask(A.shape[-1], strict, A.device), 0.0)
        q_eff = q
    elif g.dim() == 4:
        A = (q @ k.transpose(-1, -2)) * segment_sum(g, strict).exp()
        q_eff = q * prefix_sum(g, -1, exclusive=strict).exp().unsqueeze(-1)
    else:
        A = _intra_vector(q, k, g, strict)
        q_eff = q * prefix_sum(g, -2, exclusive=strict).exp()
    o_zero = A @ v
    if bonus is not None:
        o_zero = o_zero + (q * k * bonus[None, :, None, None, :]).sum(-1, keepdim=True) * v
    trans, incr = gla_chunk_transition(k, v, g)
    return o_zero, q_eff, trans, incr


def gla_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, h0: Tensor, chunk_size: int,
              packing: Packing | None = None, *, bonus: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunked GLA on prepared inputs (compute dtype, q scaled, g expanded to `[B,T,H]` or `[B,T,H,K]`).

    With `packing` (varlen, B == 1) every sequence already starts on a chunk boundary and h0 is
    `[S, H, K, V]`. Returns (o `[B, T, H, V]`, final state `[B or S, H, K, V]`).
    """
    T = k.shape[1]
    chunked = [None if x is None else to_chunks(pad_time(x, chunk_size), chunk_size) for x in (q, k, v, g)]
    o_zero, q_eff, trans, incr = gla_chunk_pieces(*chunked, bonus)
    starts, finals = scan_chunks(trans, incr, h0, packing, chunk_size)
    o = from_chunks(o_zero + q_eff @ starts)
    return o[:, :T], finals
