"""Gated linear attention: the one primitive behind linear attention, Retention, Lightning, Mamba2's
SSD, GLA, HGRN2 and RWKV6, differing only in the shape of the decay.

    S_t = diag(a_t) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t

`gla` checks its inputs, picks a backend and a form; the torch forms are the step-by-step
`gla_recurrent` below and the chunked form in `gla_chunk.py`.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from . import _varlen
from ._checks import (check_chunk_size, check_qkv, check_cu_seqlens, check_mode, check_shape,
                      compute_dtype, pick_mode, resolve, run_backend)
from .context import sequence_parallel_handler
from .gla_chunk import gla_chunk

NORMALIZE_EPS = 1e-6


def decay_kind(log_decay: Tensor | None, B: int, T: int, H: int, K: int) -> str:
    """"none" | "constant" ([H]) | "scalar" ([B,T,H]) | "vector" ([B,T,H,K]); ValueError otherwise."""
    if log_decay is None:
        return "none"
    allowed = f"None, [H]={(H,)}, [B,T,H]={(B, T, H)} or [B,T,H,K]={(B, T, H, K)}"
    if not isinstance(log_decay, Tensor):
        raise ValueError(f"log_decay must be a tensor ({allowed}), got {type(log_decay).__name__}")
    for kind, shape in (("constant", (H,)), ("scalar", (B, T, H)), ("vector", (B, T, H, K))):
        if tuple(log_decay.shape) == shape:
            return kind
    raise ValueError(f"log_decay has shape {tuple(log_decay.shape)} (rank {log_decay.dim()}); allowed: {allowed}")


def gla(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None = None, *, bonus: Tensor | None = None,
        scale: float | None = None, normalize: bool = False, initial_state: Tensor | None = None,
        output_final_state: bool = False, cu_seqlens: Tensor | None = None, mode: str = "auto",
        chunk_size: int = 64, backend: str | None = None) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention `S_t = diag(a_t) S_{t-1} + k_t^T v_t`, `o_t = scale * q_t S_t`.

    Args:
        q, k: `[B, T, H, K]`; v: `[B, T, H, V]`.
        log_decay: log a_t (<= 0): None (no decay), `[H]` (constant per head), `[B, T, H]`
            (data-dependent scalar) or `[B, T, H, K]` (data-dependent vector over the key dim).
        bonus: u `[H, K]` (RWKV6): `o_t = scale * q_t (S_{t-1} + diag(u) k_t^T v_t)`.
        scale: query scale, default `K ** -0.5`.
        normalize: `o_t = (q_t S_t) / (q_t . z_t + 1e-6)` with `z_t` the (decayed) sum of keys; the
            state then has V+1 columns (last = z), also for `initial_state`.
        initial_state: `[B, H, K, V]` (`[N, H, K, V]` with cu_seqlens), zeros when None.
        output_final_state: return the final state (else None).
        cu_seqlens: int `[N+1]` boundaries of packed sequences along time (needs B == 1); the state
            restarts from initial_state[n] at each.
        mode: "recurrent" | "chunk" | "auto" (recurrent when every sequence has <= 16 steps).
        chunk_size: steps per chunk in the chunked form (any positive int; T need not divide).
        backend: None/"auto" | "torch" | "fla" | "triton" (see `linear_moe.ops.backends`).
    Returns:
        o `[B, T, H, V]` in q.dtype, final state `[B or N, H, K, V(+1)]` in fp32 (or None).
    """
    if (sp := sequence_parallel_handler()) is not None:  # time split over devices (parallel/lasp2.py)
        return sp.gla(q, k, v, log_decay, bonus=bonus, scale=scale, normalize=normalize,
                      initial_state=initial_state, output_final_state=output_final_state,
                      cu_seqlens=cu_seqlens, mode=mode, chunk_size=chunk_size, backend=backend)
    B, T, H, K, V, kind = _check_gla(q, k, v, log_decay, bonus, normalize, initial_state, cu_seqlens,
                                     mode, chunk_size)
    requires_grad = torch.is_grad_enabled() and any(
        isinstance(x, Tensor) and x.requires_grad for x in (q, k, v, log_decay, bonus, initial_state))
    name = resolve("gla", backend, q, decay=kind, bonus=bonus is not None, normalize=normalize,
                   requires_grad=requires_grad, k_dim=K, v_dim=V, cu_seqlens=cu_seqlens is not None)
    if name != "torch":
        return run_backend(name, "gla", q, k, v, log_decay, bonus=bonus, scale=scale, normalize=normalize,
                           initial_state=initial_state, output_final_state=output_final_state,
                           cu_seqlens=cu_seqlens, mode=mode, chunk_size=chunk_size)
    return gla_torch(q, k, v, log_decay, bonus=bonus, scale=scale, normalize=normalize,
                     initial_state=initial_state, output_final_state=output_final_state,
                     cu_seqlens=cu_seqlens, mode=mode, chunk_size=chunk_size)


def _check_gla(q, k, v, log_decay, bonus, normalize, initial_state, cu_seqlens, mode, chunk_size):
    B, T, H, K, V = check_qkv(q, k, v)
    kind = decay_kind(log_decay, B, T, H, K)
    check_shape("bonus", bonus, (H, K), "[H, K]")
    n = check_cu_seqlens(cu_seqlens, B, T)
    check_shape("initial_state", initial_state, (B if n is None else n, H, K, V + int(bool(normalize))),
                "[N, H, K, V+1]" if normalize else "[B (or N with cu_seqlens), H, K, V]")
    check_mode(mode)
    check_chunk_size(chunk_size)
    return B, T, H, K, V, kind


def gla_torch(q, k, v, log_decay=None, *, bonus=None, scale=None, normalize=False, initial_state=None,
              output_final_state=False, cu_seqlens=None, mode="auto", chunk_size=64):
    """The pure-PyTorch `gla` (same arguments, inputs already checked)."""
    B, T, H, K = q.shape
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else scale
    q, k, v = q.to(dtype) * scale, k.to(dtype), v.to(dtype)
    if normalize:
        v = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)
    g = None if log_decay is None else log_decay.to(dtype)
    if g is not None and g.dim() == 1:
        g = g.expand(B, T, H)
    u = None if bonus is None else bonus.to(dtype)
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    h0 = (q.new_zeros(n_seq, H, K, v.shape[-1]) if initial_state is None else initial_state.to(dtype))
    o, final = _varlen.run_recurrence(partial(gla_recurrent, bonus=u), partial(gla_chunk, bonus=u),
                                      (q, k, v, g), h0, cu_seqlens,
                                      pick_mode(mode, cu_seqlens, T) == "recurrent", chunk_size)
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + scale * NORMALIZE_EPS)  # scale cancels: = qS / (q.z + eps)
    return o.to(out_dtype), (final if output_final_state else None)


def gla_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, h0: Tensor, *,
                  bonus: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Step-by-step GLA on prepared inputs (q already scaled; g None, `[B,T,H]` or `[B,T,H,K]`).
    Also the decode step (T == 1). Returns (o `[B, T, H, V]`, final state `[B, H, K, V]`)."""
    state = h0
    outputs = []
    for t in range(q.shape[1]):
        kv = k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)  # [B, H, K, V]
        if bonus is not None:
            outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state + bonus.unsqueeze(-1) * kv))
        if g is not None:
            a = g[:, t].exp()
            state = state * (a.unsqueeze(-1) if a.dim() == 3 else a[..., None, None])
        state = state + kv
        if bonus is None:
            outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    if not outputs:
        return v.new_zeros(v.shape), state
    return torch.stack(outputs, dim=1), state
