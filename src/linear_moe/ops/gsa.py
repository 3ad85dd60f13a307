"""Gated slot attention (GSA): two gated linear-attention passes coupled by a softmax over ``M`` slots.

Per head, with forget gate ``a_t = exp(log_decay_t) ∈ (0, 1]^M`` and slot write weights ``s_t`` (GSA uses
``s_t = 1 - a_t``):

    K̃_t = K̃_{t-1} diag(a_t) + k_tᵀ s_t            [K, M]   slot keys   (decay along the slot dim)
    Ṽ_t = diag(a_t) Ṽ_{t-1} + s_tᵀ v_t            [M, V]   slot values (a plain GLA, key = s_t)
    o_t = softmax(scale · q_t K̃_t) Ṽ_t

The torch form runs both passes through :func:`linear_moe.ops.gla`. Its first pass decays along the value
(slot) dim, which ``gla`` does not offer, so each slot becomes its own head with a scalar decay (key dim K,
value dim 1): exact, but ``M`` times the first pass's intra-chunk work and memory. On CUDA the "fla" backend
runs fla's ``chunk_gsa``, which decays the value dim directly. Under sequence parallelism (LASP-2) the torch
form is used, so each pass goes through the parallel ``gla``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import (check_chunk_size, check_cu_seqlens, check_mode, check_qkv, check_rank, check_shape, resolve,
                      run_backend)
from .context import sequence_parallel_handler
from .gla import gla


def gsa(q: Tensor, k: Tensor, v: Tensor, s: Tensor, log_decay: Tensor, *, scale: float | None = None,
        initial_state: tuple[Tensor, Tensor] | None = None, output_final_state: bool = False,
        cu_seqlens: Tensor | None = None, mode: str = "auto", chunk_size: int = 64,
        backend: str | None = None) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Gated slot attention (see the module docstring).

    Args:
        q, k: `[B, T, H, K]`; v: `[B, T, H, V]`.
        s: slot write weights `[B, T, H, M]`; log_decay: log a_t (<= 0) `[B, T, H, M]`.
        scale: query scale inside the slot softmax, default `K ** -0.5` (the GSA paper uses 1).
        initial_state: (slot keys `[N, H, K, M]`, slot values `[N, H, M, V]`) with N = B (or the number of
            packed sequences), zeros when None.
        output_final_state: return the final (slot keys, slot values) in fp32 (else None).
        cu_seqlens, mode, chunk_size, backend: as for :func:`linear_moe.ops.gla`.
    Returns:
        o `[B, T, H, V]` in q.dtype, and the final state or None.
    """
    B, T, H, K, V = check_qkv(q, k, v)
    check_rank("s", s, 4, "[B, T, H, M]")
    M = s.shape[-1]
    check_shape("s", s, (B, T, H, M), "[B, T, H, M] with B, T, H of q")
    check_shape("log_decay", log_decay, (B, T, H, M), "[B, T, H, M] like s")
    n = check_cu_seqlens(cu_seqlens, B, T)
    N = B if n is None else n
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError("initial_state must be a pair (slot keys [N, H, K, M], slot values [N, H, M, V]), "
                             f"got {type(initial_state).__name__}")
        check_shape("initial_state[0]", initial_state[0], (N, H, K, M), "[N, H, K, M] (slot keys)")
        check_shape("initial_state[1]", initial_state[1], (N, H, M, V), "[N, H, M, V] (slot values)")
    check_mode(mode)
    check_chunk_size(chunk_size)
    scale = K ** -0.5 if scale is None else scale
    run = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
               cu_seqlens=cu_seqlens, mode=mode, chunk_size=chunk_size)
    if sequence_parallel_handler() is None:
        requires_grad = torch.is_grad_enabled() and any(
            isinstance(x, Tensor) and x.requires_grad
            for x in (q, k, v, s, log_decay, *(initial_state or ())))
        name = resolve("gsa", backend, q, requires_grad=requires_grad, k_dim=K, v_dim=V, m_dim=M,
                       cu_seqlens=cu_seqlens is not None)
        if name != "torch":
            return run_backend(name, "gsa", q, k, v, s, log_decay, **run)
    return gsa_two_pass(q, k, v, s, log_decay, backend=backend, **run)


def gsa_two_pass(q, k, v, s, log_decay, *, scale, initial_state=None, output_final_state=False, cu_seqlens=None,
                 mode="auto", chunk_size=64, backend=None):
    """GSA as two :func:`gla` calls (inputs already checked; ``scale`` given). The first pass folds the slots
    into heads; ``backend`` goes to both calls, so each still picks its own kernel (or LASP-2's parallel form)."""
    B, T, H, K = q.shape
    M = s.shape[-1]
    hk0, hv0 = (None, None) if initial_state is None else initial_state
    run = dict(output_final_state=output_final_state, cu_seqlens=cu_seqlens, mode=mode, chunk_size=chunk_size,
               backend=backend)
    # Pass 1: one head per (head, slot) with that slot's scalar decay; its 1-wide value is the slot's write weight.
    per_slot = lambda t: t.unsqueeze(3).expand(B, T, H, M, K).reshape(B, T, H * M, K)  # noqa: E731
    keys0 = None if hk0 is None else hk0.transpose(-1, -2).reshape(hk0.shape[0], H * M, K, 1)
    scores, hk = gla(per_slot(q), per_slot(k), s.reshape(B, T, H * M, 1).to(q.dtype),
                     log_decay.reshape(B, T, H * M), scale=scale, initial_state=keys0, **run)
    p = scores.view(B, T, H, M).float().softmax(-1)
    # Pass 2: a plain GLA over the slots (key = write weight, vector decay), read with the softmax weights.
    o, hv = gla(p.to(v.dtype), s.to(v.dtype), v, log_decay, scale=1.0, initial_state=hv0, **run)
    if not output_final_state:
        return o.to(q.dtype), None
    return o.to(q.dtype), (hk.reshape(hk.shape[0], H, M, K).transpose(-1, -2), hv)
