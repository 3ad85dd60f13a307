"""The separable pieces of the chunked forms, for sequence parallelism (LASP-2).

Every recurrence here is affine in its initial state, so a block of a sequence (one device's share)
splits into three independent parts:

    output      = output from a zero state            -> `gla(...)` / `delta_rule(...)` as usual
                + contribution of the initial state   -> `gla_state_output` / `delta_rule_state_output`
    final state = block state from zero + transition(initial state)
                                                      -> `gla_chunk_state` / `delta_rule_chunk_state`

LASP-2 gathers every block's (state, transition), combines them into each block's initial state,
and adds the contribution. All functions are pure PyTorch and differentiable.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import compute_dtype
from .delta_rule import delta_rule_torch
from .delta_rule_chunk import delta_chunk_pieces
from .gla_chunk import gla_chunk_transition, pad_time, to_chunks


def _prep_gla_decay(log_decay, B, T, H, dtype):
    if log_decay is None:
        return None
    g = log_decay.to(dtype)
    return g.expand(B, T, H) if g.dim() == 1 else g


def gla_chunk_state(k: Tensor, v: Tensor, log_decay: Tensor | None = None, *, chunk_size: int = 64
                    ) -> tuple[Tensor, Tensor]:
    """A block's GLA state from a zero start, and its total decay.

    Args: k `[B, T, H, K]`, v `[B, T, H, V]`, log_decay as in `gla` (None, `[H]`, `[B,T,H]`, `[B,T,H,K]`).
        (For `normalize=True` pass v with its ones column appended.)
    Returns:
        state `[B, H, K, V]` (fp32) and total log-decay `[B, H, K]`, such that the block's final
        state from an initial state S0 is `exp(total)[..., None] * S0 + state`.
    """
    B, T, H, K = k.shape
    dtype = compute_dtype(k.dtype)
    g = _prep_gla_decay(log_decay, B, T, H, dtype)
    k_, v_, g_ = (None if x is None else to_chunks(pad_time(x.to(dtype), chunk_size), chunk_size)
                  for x in (k, v, g))
    trans, incr = gla_chunk_transition(k_, v_, g_)
    state = k.new_zeros(B, H, K, v.shape[-1], dtype=dtype)
    for n in range(incr.shape[2]):
        state = trans[:, :, n].unsqueeze(-1) * state + incr[:, :, n]
    if g is None:
        total = k.new_zeros(B, H, K, dtype=dtype)
    else:
        total = g.sum(1)
        total = total.unsqueeze(-1).expand(B, H, K) if total.dim() == 2 else total
    return state, total


def gla_state_output(q: Tensor, state: Tensor, log_decay: Tensor | None = None, *,
                     scale: float | None = None, exclusive: bool = False) -> Tensor:
    """The part of `gla`'s output due to its initial state: `scale * (q_t * exp(G_t)) @ S0`.

    Args: q `[B, T, H, K]`; state S0 `[B, H, K, V]`; log_decay as in `gla`; exclusive=True for a
        bonus (RWKV6), whose output reads the state before step t (G_t -> G_{t-1}).
    Returns: `[B, T, H, V]` in fp32 (before any `normalize` division).
    """
    B, T, H, K = q.shape
    dtype = compute_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else scale
    qd = q.to(dtype) * scale
    g = _prep_gla_decay(log_decay, B, T, H, dtype)
    if g is not None:
        G = g.cumsum(1)
        if exclusive:
            G = G - g
        qd = qd * (G.exp() if G.dim() == 4 else G.exp().unsqueeze(-1))
    return torch.einsum("bthk,bhkv->bthv", qd, state.to(dtype))


def delta_rule_chunk_state(k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None = None, *,
                           chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """A block's delta-rule state from a zero start, and its transition matrix.

    Args: k `[B, T, H, K]`, v `[B, T, H, V]`, beta `[B, T, H]`, log_decay None or `[B, T, H]`.
    Returns:
        state `[B, H, K, V]` and transition `[B, H, K, K]` (fp32), such that the block's final state
        from an initial state S0 is `transition @ S0 + state`.
    """
    B, T, H, K = k.shape
    dtype = compute_dtype(k.dtype)
    parts = [None if x is None else to_chunks(pad_time(x.to(dtype), chunk_size), chunk_size)
             for x in (k, v, beta, log_decay)]
    _, _, trans, incr = delta_chunk_pieces(parts[0], *parts)  # q is unused for the state
    state = k.new_zeros(B, H, K, v.shape[-1], dtype=dtype)
    transition = torch.eye(K, dtype=dtype, device=k.device).expand(B, H, K, K)
    for n in range(incr.shape[2]):
        state = trans[:, :, n] @ state + incr[:, :, n]
        transition = trans[:, :, n] @ transition
    return state, transition


def delta_rule_state_output(q: Tensor, k: Tensor, beta: Tensor, state: Tensor,
                            log_decay: Tensor | None = None, *, scale: float | None = None,
                            chunk_size: int = 64) -> Tensor:
    """The part of `delta_rule`'s output due to its initial state S0 `[B, H, K, V]`.

    The recurrence is affine in (v, S0), so this is the delta rule run with v = 0 from S0.
    Returns `[B, T, H, V]` in fp32.
    """
    B, T, H, K = q.shape
    dtype = compute_dtype(q.dtype)
    zeros = q.new_zeros(B, T, H, state.shape[-1], dtype=dtype)
    o, _ = delta_rule_torch(q.to(dtype), k, zeros, beta, log_decay, scale=scale, initial_state=state,
                            mode="chunk", chunk_size=chunk_size)
    return o
