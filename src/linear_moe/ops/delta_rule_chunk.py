"""Chunked (gated) delta rule in pure PyTorch, by the WY / UT-transform representation
(Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length";
the gate as in Gated DeltaNet).

Write the update as S_t = a_t S_{t-1} + k_t^T u_t with u_t = beta_t (v_t - k_t a_t S_{t-1}). Inside
a chunk, with gamma_i = exp(G_i) the decay since the chunk start, unrolling gives

    S_i = gamma_i S_0 + sum_{j<=i} (gamma_i / gamma_j) k_j^T u_j
    (I + L) U = diag(beta) V - diag(beta gamma) K S_0,   L_ij = beta_i (gamma_i/gamma_j) k_i.k_j  (j < i)

so with the unit lower-triangular solve W = (I + L)^{-1} [beta V, beta gamma K] = [W_v, W_k]:
U = W_v - W_k S_0, and everything is linear in S_0:

    o   = A W_v + (gamma q - A W_k) S_0,             A_ij = (q_i.k_j) gamma_i/gamma_j  (j <= i)
    S_C = K~^T W_v + (gamma_C I - K~^T W_k) S_0,     K~_j = k_j gamma_C / gamma_j

Every ratio gamma_i/gamma_j has i >= j and is summed over its own stretch (`_decay.py`), so exp()
sees only exponents <= 0, each accurate to fp32 rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._chunk_scan import scan_chunks
from ._decay import prefix_sum, segment_sum, suffix_sum
from ._varlen import Packing
from .gla_chunk import from_chunks, pad_time, to_chunks


def delta_chunk_pieces(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All chunks at once, each as if it started from a zero state.

    Args (chunked layout): q (already scaled), k `[B,H,N,C,K]`; v `[B,H,N,C,V]`; beta, g `[B,H,N,C]`
        (g None without a gate).
    Returns:
        o_zero `[B,H,N,C,V]`; q_eff `[B,H,N,C,K]` (o = o_zero + q_eff @ S_start);
        trans `[B,H,N,K,K]` and incr `[B,H,N,K,V]` (S_end = trans @ S_start + incr).
    """
    C, K = k.shape[-2:]
    if g is None:
        decay = torch.ones(C, C, dtype=k.dtype, device=k.device).tril()
        gamma = k.new_ones(k.shape[:-1])
    else:
        decay = segment_sum(g).exp()  # gamma_i / gamma_j for j <= i, else 0
        gamma = prefix_sum(g).exp()
    L = (k @ k.transpose(-1, -2) * decay).tril(-1) * beta.unsqueeze(-1)
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    rhs = torch.cat([beta.unsqueeze(-1) * v, (beta * gamma).unsqueeze(-1) * k], dim=-1)
    W = torch.linalg.solve_triangular(eye + L, rhs, upper=False, unitriangular=True)
    W_v, W_k = W[..., :v.shape[-1]], W[..., v.shape[-1]:]
    A = q @ k.transpose(-1, -2) * decay
    o_zero = A @ W_v
    q_eff = gamma.unsqueeze(-1) * q - A @ W_k
    gamma_last = gamma[..., -1:]
    k_to_end = k if g is None else k * suffix_sum(g).exp().unsqueeze(-1)
    incr = k_to_end.transpose(-1, -2) @ W_v
    trans = gamma_last.unsqueeze(-1) * torch.eye(K, dtype=k.dtype, device=k.device) - k_to_end.transpose(-1, -2) @ W_k
    return o_zero, q_eff, trans, incr


def delta_rule_chunk(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, h0: Tensor,
                     chunk_size: int, packing: Packing | None = None) -> tuple[Tensor, Tensor]:
    """Chunked delta rule on prepared inputs (compute dtype, q scaled, beta/g `[B,T,H]`).

    With `packing` (varlen, B == 1) every sequence starts on a chunk boundary and h0 is `[S,H,K,V]`.
    Returns (o `[B, T, H, V]`, final state `[B or S, H, K, V]`).
    """
    T = k.shape[1]
    q, k, v, beta, g = (pad_time(x, chunk_size) for x in (q, k, v, beta, g))
    chunked = [None if x is None else to_chunks(x, chunk_size) for x in (q, k, v, beta, g)]
    o_zero, q_eff, trans, incr = delta_chunk_pieces(*chunked)
    starts, finals = scan_chunks(trans, incr, h0, packing, chunk_size)
    return from_chunks(o_zero + q_eff @ starts)[:, :T], finals
