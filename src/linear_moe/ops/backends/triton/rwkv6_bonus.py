"""RWKV6 on chunk_gla, the step after the kernel (``backends/fla.py: _rwkv6_on_chunk_gla``), as one Triton kernel
each way.

The shifted-query route runs chunk_gla on ``q`` one token early, so its output ``o_early[t - 1]`` is RWKV6's state
read for token t; what is left is the shift back and RWKV6's bonus for the current token:

    o[t] = (0 if t starts a sequence else o_early[t - 1]) + scale * (q[t] . u . k[t]) v[t]

In PyTorch that was a roll, a mask and four passes for the bonus, each with autograd's saved copies: 3.9 ms at
32K tokens (H=16, D=128) on the H100 against chunk_gla's own 7.2. Here the forward reads o_early, q, k, v once
and writes o; the backward reads do, q, k, v once and writes d_o_early, dq, dk, dv, and per-block partial sums of
du. One program per (block of tokens, head), so every row of a program shares its head's ``u`` and ``du`` sums
without atomics.

Imported lazily (CUDA tensors, or tests under ``TRITON_INTERPRET=1`` on CPU), so the package imports without
Triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block(pid, h, n_tokens, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BLOCK_T: tl.constexpr,
           BK: tl.constexpr, BV: tl.constexpr):
    """This program's tokens, which of them exist, their rows of ``[B*T*H, D]`` (the head is the fastest index),
    the key and value column ranges, and the masks of the ``[BLOCK_T, BK]`` and ``[BLOCK_T, BV]`` tiles."""
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    live = tok < n_tokens
    row = tok.to(tl.int64) * H + h
    ck, cv = tl.arange(0, BK), tl.arange(0, BV)
    return tok, live, row, ck, cv, live[:, None] & (ck[None, :] < K), live[:, None] & (cv[None, :] < V)


@triton.jit
def _bonus_fwd_kernel(o_early_ptr, q_ptr, k_ptr, v_ptr, u_ptr, first_ptr, o_ptr, score_ptr, n_tokens, scale,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BLOCK_T: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr):
    pid, h = tl.program_id(0), tl.program_id(1)
    tok, live, row, ck, cv, mk, mv = _block(pid, h, n_tokens, H, K, V, BLOCK_T, BK, BV)
    q = tl.load(q_ptr + row[:, None] * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + row[:, None] * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + h * K + ck, mask=ck < K, other=0.0).to(tl.float32)
    score = tl.sum(q * u[None, :] * k, axis=1) * scale  # [BLOCK_T]
    v = tl.load(v_ptr + row[:, None] * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)
    first = tl.load(first_ptr + tok, mask=live, other=1) != 0
    # the previous token's row of o_early, except at a sequence's first token (token 0 is always one)
    prev = tl.load(o_early_ptr + (row - H)[:, None] * V + cv[None, :], mask=mv & ~first[:, None], other=0.0)
    o = prev.to(tl.float32) + score[:, None] * v
    tl.store(o_ptr + row[:, None] * V + cv[None, :], o.to(o_ptr.dtype.element_ty), mask=mv)
    tl.store(score_ptr + row, score, mask=live)


@triton.jit
def _bonus_bwd_kernel(do_ptr, q_ptr, k_ptr, v_ptr, u_ptr, first_ptr, score_ptr, d_o_early_ptr, dq_ptr, dk_ptr,
                      dv_ptr, du_part_ptr, n_tokens, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BLOCK_T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    pid, h = tl.program_id(0), tl.program_id(1)
    tok, live, row, ck, cv, mk, mv = _block(pid, h, n_tokens, H, K, V, BLOCK_T, BK, BV)
    do = tl.load(do_ptr + row[:, None] * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row[:, None] * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)
    score = tl.load(score_ptr + row, mask=live, other=0.0)
    tl.store(dv_ptr + row[:, None] * V + cv[None, :], (score[:, None] * do).to(dv_ptr.dtype.element_ty), mask=mv)
    g = tl.sum(do * v, axis=1) * scale  # d loss / d (q . u . k)
    q = tl.load(q_ptr + row[:, None] * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + row[:, None] * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + h * K + ck, mask=ck < K, other=0.0).to(tl.float32)
    gu = g[:, None] * u[None, :]
    tl.store(dq_ptr + row[:, None] * K + ck[None, :], (gu * k).to(dq_ptr.dtype.element_ty), mask=mk)
    tl.store(dk_ptr + row[:, None] * K + ck[None, :], (gu * q).to(dk_ptr.dtype.element_ty), mask=mk)
    tl.store(du_part_ptr + (pid * H + h) * K + ck, tl.sum(g[:, None] * q * k, axis=0), mask=ck < K)
    # o_early[t] went to o[t + 1] unless t + 1 starts a sequence (or is past the end)
    nxt = tok + 1
    carried = live & (nxt < n_tokens)
    carried = carried & (tl.load(first_ptr + nxt, mask=carried, other=1) == 0)
    d_prev = tl.load(do_ptr + (row + H)[:, None] * V + cv[None, :], mask=mv & carried[:, None], other=0.0)
    tl.store(d_o_early_ptr + row[:, None] * V + cv[None, :], d_prev.to(d_o_early_ptr.dtype.element_ty), mask=mv)


def _launch(n_tokens: int, H: int, K: int, V: int) -> tuple[tuple[int, int], dict]:
    block_t = 32 if max(K, V) > 64 else 64
    meta = dict(H=H, K=K, V=V, BLOCK_T=block_t, BK=triton.next_power_of_2(K), BV=triton.next_power_of_2(V),
                num_warps=4)
    return (triton.cdiv(n_tokens, block_t), H), meta


class _ShiftBonus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_early, q, k, v, u, first, scale):
        B, T, H, K = q.shape
        V = v.shape[-1]
        o_early, q, k, v = (t.contiguous() for t in (o_early, q, k, v))
        u = u.float().contiguous()
        o = torch.empty_like(o_early)
        score = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
        grid, meta = _launch(B * T, H, K, V)
        _bonus_fwd_kernel[grid](o_early, q, k, v, u, first, o, score, B * T, scale, **meta)
        ctx.save_for_backward(q, k, v, u, first, score)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, u, first, score = ctx.saved_tensors
        B, T, H, K = q.shape
        V = v.shape[-1]
        do = do.contiguous()
        d_o_early, dv = torch.empty_like(do), torch.empty_like(v)
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        grid, meta = _launch(B * T, H, K, V)
        du_part = torch.empty(grid[0], H, K, dtype=torch.float32, device=q.device)
        _bonus_bwd_kernel[grid](do, q, k, v, u, first, score, d_o_early, dq, dk, dv, du_part, B * T, ctx.scale, **meta)
        return d_o_early, dq, dk, dv, du_part.sum(0), None, None


def shift_and_bonus(o_early: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
                    first: torch.Tensor, scale: float) -> torch.Tensor:
    """``o[t] = (0 if first[t] else o_early[t - 1]) + scale (q[t] . u . k[t]) v[t]`` with its backward.

    o_early, v ``[B,T,H,V]``; q, k ``[B,T,H,K]`` (one dtype); u ``[H,K]`` (any float dtype; its gradient comes back
    in fp32 and autograd casts it); first ``[B*T]`` bool/int8, true at each sequence's first token (token 0 of every
    batch row included). Returns o ``[B,T,H,V]`` in o_early's dtype."""
    if q.shape != k.shape or o_early.shape != v.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"o_early {tuple(o_early.shape)}: want q, k [B,T,H,K] and v, o_early [B,T,H,V]")
    if first.numel() != q.shape[0] * q.shape[1]:
        raise ValueError(f"first has {first.numel()} entries, want B*T = {q.shape[0] * q.shape[1]}")
    return _ShiftBonus.apply(o_early, q, k, v, u, first.to(torch.int8).contiguous(), float(scale))
