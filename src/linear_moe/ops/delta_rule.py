"""The (gated) delta rule: DeltaNet and Gated DeltaNet's state update.

    S_t = a_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,    o_t = scale * q_t S_t

Each step moves the value stored under key k_t towards v_t by the fraction beta_t (a rank-one
correction), after decaying the whole state by a_t. `delta_rule` checks, picks a backend and a form;
the torch forms are `delta_rule_recurrent` below and the chunked form in `delta_rule_chunk.py`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _varlen
from ._checks import (check_chunk_size, check_qkv, check_cu_seqlens, check_mode, check_shape,
                      compute_dtype, pick_mode, resolve, run_backend)
from .context import sequence_parallel_handler
from .delta_rule_chunk import delta_rule_chunk


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None = None, *,
               scale: float | None = None, initial_state: Tensor | None = None,
               output_final_state: bool = False, cu_seqlens: Tensor | None = None, mode: str = "auto",
               chunk_size: int = 64, backend: str | None = None,
               qk_l2norm: bool = False) -> tuple[Tensor, Tensor | None]:
    """(Gated) delta rule `S_t = a_t (I - b_t k_t^T k_t) S_{t-1} + b_t k_t^T v_t`, `o_t = scale * q_t S_t`.

    Args:
        q, k: `[B, T, H, K]` (used as given unless ``qk_l2norm``); v: `[B, T, H, V]`.
        beta: `[B, T, H]` write strength b_t.
        log_decay: None (DeltaNet) or `[B, T, H]` log a_t <= 0 (Gated DeltaNet).
        scale, initial_state, output_final_state, cu_seqlens, mode, chunk_size, backend: as in `gla`.
        qk_l2norm: L2-normalise q and k first (:func:`l2_normalize`), as DeltaNet's layer does; the fla backend
            does it inside its kernel (one pass each way), the others beforehand.
    Returns:
        o `[B, T, H, V]` in q.dtype, final state `[B or N, H, K, V]` in fp32 (or None).
    """
    if (sp := sequence_parallel_handler()) is not None:  # time split over devices (parallel/lasp2.py)
        if qk_l2norm:
            q, k = l2_normalize(q), l2_normalize(k)
        return sp.delta_rule(q, k, v, beta, log_decay, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens, mode=mode,
                             chunk_size=chunk_size, backend=backend)
    B, T, H, K, V = check_qkv(q, k, v)
    check_shape("beta", beta, (B, T, H), "[B, T, H]")
    if log_decay is not None and (not isinstance(log_decay, Tensor) or tuple(log_decay.shape) != (B, T, H)):
        got = tuple(log_decay.shape) if isinstance(log_decay, Tensor) else type(log_decay).__name__
        raise ValueError(f"log_decay for delta_rule must be None or [B, T, H] = {(B, T, H)}, got {got}")
    n = check_cu_seqlens(cu_seqlens, B, T)
    check_shape("initial_state", initial_state, (B if n is None else n, H, K, V),
                "[B (or N with cu_seqlens), H, K, V]")
    check_mode(mode)
    check_chunk_size(chunk_size)
    requires_grad = torch.is_grad_enabled() and any(
        isinstance(x, Tensor) and x.requires_grad for x in (q, k, v, beta, log_decay, initial_state))
    name = resolve("delta_rule", backend, q, decay="none" if log_decay is None else "scalar",
                   requires_grad=requires_grad, k_dim=K, v_dim=V, cu_seqlens=cu_seqlens is not None)
    if name != "torch":
        return run_backend(name, "delta_rule", q, k, v, beta, log_decay, scale=scale,
                           initial_state=initial_state, output_final_state=output_final_state,
                           cu_seqlens=cu_seqlens, mode=mode, chunk_size=chunk_size, qk_l2norm=qk_l2norm)
    if qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    return delta_rule_torch(q, k, v, beta, log_decay, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens, mode=mode,
                            chunk_size=chunk_size)


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(sum(x²) + eps)`` over the last dim, computed in fp32 (fp64 stays fp64), returned in x.dtype
    (fla's in-kernel L2 norm has the same eps inside the root)."""
    xf = x.to(compute_dtype(x.dtype))
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def delta_rule_torch(q, k, v, beta, log_decay=None, *, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, mode="auto", chunk_size=64):
    """The pure-PyTorch `delta_rule` (same arguments, inputs already checked)."""
    B, T, H, K = q.shape
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else scale
    q, k, v, beta = q.to(dtype) * scale, k.to(dtype), v.to(dtype), beta.to(dtype)
    g = None if log_decay is None else log_decay.to(dtype)
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    h0 = q.new_zeros(n_seq, H, K, v.shape[-1]) if initial_state is None else initial_state.to(dtype)
    o, final = _varlen.run_recurrence(delta_rule_recurrent, delta_rule_chunk, (q, k, v, beta, g), h0,
                                      cu_seqlens, pick_mode(mode, cu_seqlens, T) == "recurrent", chunk_size)
    return o.to(out_dtype), (final if output_final_state else None)


def delta_rule_recurrent(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None,
                         h0: Tensor) -> tuple[Tensor, Tensor]:
    """Step-by-step delta rule on prepared inputs (q already scaled, beta/g `[B, T, H]`).
    Also the decode step (T == 1). Returns (o `[B, T, H, V]`, final state `[B, H, K, V]`)."""
    state = h0
    outputs = []
    for t in range(q.shape[1]):
        if g is not None:
            state = state * g[:, t].exp()[..., None, None]
        k_t = k[:, t]
        predicted = torch.einsum("bhk,bhkv->bhv", k_t, state)  # what the state recalls under k_t
        correction = beta[:, t].unsqueeze(-1) * (v[:, t] - predicted)
        state = state + k_t.unsqueeze(-1) * correction.unsqueeze(-2)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    if not outputs:
        return v.new_zeros(v.shape), state
    return torch.stack(outputs, dim=1), state
