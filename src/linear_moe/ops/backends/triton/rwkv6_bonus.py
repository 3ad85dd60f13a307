"""RWKV6 on chunk_gla, the step after the kernel (``backends/fla.py: _rwkv6_on_chunk_gla``), as one Triton kernel
each way.

The shifted-query route runs chunk_gla on ``q`` one token early, so its output ``o_early[t - 1]`` is RWKV6's state
read for token t; what is left is the shift back and RWKV6's bonus for the current token:

    o[t] = (0 if t starts a sequence else o_early[t - 1]) + scale * (q[t] . u . k[t]) v[t]

In PyTorch that was a roll, a mask and four passes for the bonus, each with autograd's saved copies: 3.9 ms at
32K tokens (H=16, D=128) on the H100 against chunk_gla's own 7.2. Here the forward reads o_early, q, k, v once
and writes o. One program per (block of tokens, head), so every row of a program shares its head's ``u`` and
``du`` sums without atomics.

Two backward forms. ``shift_and_bonus`` alone: one kernel reads do, q, k, v and writes d_o_early, dq, dk, dv and
per-block partial sums of du; autograd then adds dq, dk, dv to chunk_gla's gradients and rolls the query's back
(four more passes over ``[T, H, D]``). With ``link=tap(...)`` (the route's form): the bonus's backward only
writes d_o_early (the shift of do) and leaves do with the link; ``tap``, which made chunk_gla's inputs (the
query one token early), gets chunk_gla's gradients and finishes in one kernel: reads do, q, k, v and chunk_gla's
dq, dk, dv, writes the totals. At 32K tokens x 16 heads x 128 that is ~0.9 GB less traffic per step.

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
def _bonus_fwd_kernel(o_early_ptr, q_ptr, k_ptr, v_ptr, u_ptr, first_ptr, o_ptr, n_tokens, scale,
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


@triton.jit
def _bonus_bwd_kernel(do_ptr, q_ptr, k_ptr, v_ptr, u_ptr, first_ptr, d_o_early_ptr, dq_ptr, dk_ptr, dv_ptr,
                      du_part_ptr, dq_early_ptr, dk_in_ptr, dv_in_ptr, n_tokens, T, scale, H: tl.constexpr,
                      K: tl.constexpr, V: tl.constexpr, BLOCK_T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      SHIFT: tl.constexpr, BONUS: tl.constexpr, ADD: tl.constexpr):
    """SHIFT: d_o_early. BONUS: the bonus's dq, dk, dv, du; with ADD each plus chunk_gla's gradient of the same
    input (dq from the early query's, one token back: the exact inverse of the roll, boundaries or not)."""
    pid, h = tl.program_id(0), tl.program_id(1)
    tok, live, row, ck, cv, mk, mv = _block(pid, h, n_tokens, H, K, V, BLOCK_T, BK, BV)
    if BONUS:
        do = tl.load(do_ptr + row[:, None] * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row[:, None] * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + row[:, None] * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + row[:, None] * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + h * K + ck, mask=ck < K, other=0.0).to(tl.float32)
        score = tl.sum(q * u[None, :] * k, axis=1) * scale
        g = tl.sum(do * v, axis=1) * scale  # d loss / d (q . u . k)
        gu = g[:, None] * u[None, :]
        dv = score[:, None] * do
        dq = gu * k
        dk = gu * q
        if ADD:
            dv += tl.load(dv_in_ptr + row[:, None] * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)
            dk += tl.load(dk_in_ptr + row[:, None] * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
            t = tok % T  # q_early[s] = q[s + 1] within each batch row (a roll): q[t] went to q_early[t - 1]
            src = tl.where(t == 0, tok + T - 1, tok - 1).to(tl.int64) * H + h
            dq += tl.load(dq_early_ptr + src[:, None] * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
        tl.store(dv_ptr + row[:, None] * V + cv[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mv)
        tl.store(dq_ptr + row[:, None] * K + ck[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mk)
        tl.store(dk_ptr + row[:, None] * K + ck[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mk)
        tl.store(du_part_ptr + (pid * H + h) * K + ck, tl.sum(g[:, None] * q * k, axis=0), mask=ck < K)
    if SHIFT:
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


class Link:
    """Carries the bonus's output gradient from its backward (which runs first) to ``tap``'s (after chunk_gla's)."""

    def __init__(self):
        self.do: torch.Tensor | None = None


def _bonus_grads(do, q, k, v, u, first, scale, shift, bonus, add=(None, None, None)):
    """One launch of the backward kernel: returns (d_o_early or None, dq, dk, dv, du) as asked; ``first`` is read by
    the shift only (None without it)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    grid, meta = _launch(B * T, H, K, V)
    d_o_early = torch.empty_like(do) if shift else None
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v)) if bonus else (None, None, None)
    du_part = torch.empty(grid[0], H, K, dtype=torch.float32, device=q.device) if bonus else None
    dq_early, dk_in, dv_in = add
    adding = dq_early is not None
    any_ = do  # a stand-in pointer for the tensors a flag leaves unread (first: read by the shift only)
    _bonus_bwd_kernel[grid](
        do, q, k, v, u, first if shift else any_, d_o_early if shift else any_, dq if bonus else any_, dk if bonus else any_,
        dv if bonus else any_, du_part if bonus else any_, dq_early.contiguous() if adding else any_,
        dk_in.contiguous() if adding else any_, dv_in.contiguous() if adding else any_, B * T, T, scale,
        SHIFT=shift, BONUS=bonus, ADD=adding, **meta)
    return d_o_early, dq, dk, dv, (du_part.sum(0) if bonus else None)


class _ShiftBonus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_early, q, k, v, u, first, scale, link):
        B, T, H, K = q.shape
        V = v.shape[-1]
        o_early, q, k, v = (t.contiguous() for t in (o_early, q, k, v))
        u = u.float().contiguous()
        o = torch.empty_like(o_early)
        grid, meta = _launch(B * T, H, K, V)
        _bonus_fwd_kernel[grid](o_early, q, k, v, u, first, o, B * T, scale, **meta)
        ctx.save_for_backward(q, k, v, u, first)
        ctx.scale, ctx.link = scale, link
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, u, first = ctx.saved_tensors
        do = do.contiguous()
        if ctx.link is not None:  # tap's backward adds the bonus's gradients to chunk_gla's
            ctx.link.do = do
            d_o_early, *_ = _bonus_grads(do, q, k, v, u, first, ctx.scale, shift=True, bonus=False)
            return d_o_early, None, None, None, None, None, None, None
        d_o_early, dq, dk, dv, du = _bonus_grads(do, q, k, v, u, first, ctx.scale, shift=True, bonus=True)
        return d_o_early, dq, dk, dv, du, None, None, None


class _Tap(torch.autograd.Function):
    """Forward: chunk_gla's inputs (q one token early within each batch row, k and v as they are). Backward: their
    gradients plus the bonus's, in one kernel (the link brings the bonus's output gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, u, scale, link):
        ctx.save_for_backward(q, k, v, u.float().contiguous())
        ctx.scale, ctx.link = scale, link
        return q.roll(-1, dims=1), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dq_early, dk, dv):
        q, k, v, u = ctx.saved_tensors
        dq_early, dk, dv = (torch.zeros_like(t) if g is None else g for g, t in ((dq_early, q), (dk, k), (dv, v)))
        do = ctx.link.do
        if do is None:  # the bonus's output took no gradient: chunk_gla's alone
            return dq_early.roll(1, dims=1), dk, dv, None, None, None
        ctx.link.do = None
        q, k, v = (t.contiguous() for t in (q, k, v))
        _, dq, dk, dv, du = _bonus_grads(do, q, k, v, u, None, ctx.scale, shift=False, bonus=True,
                                         add=(dq_early, dk, dv))
        return dq, dk, dv, du, None, None


def tap(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor, scale: float):
    """chunk_gla's inputs for the shifted-query route: ``(q one token early, k, v, link)``; pass the link to
    ``shift_and_bonus`` so both backward passes meet in one kernel. q, k ``[B,T,H,K]``, v ``[B,T,H,V]``, u ``[H,K]``."""
    link = Link()
    q_early, k_out, v_out = _Tap.apply(q, k, v, u, float(scale), link)
    return q_early, k_out, v_out, link


def shift_and_bonus(o_early: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
                    first: torch.Tensor, scale: float, link: Link | None = None) -> torch.Tensor:
    """``o[t] = (0 if first[t] else o_early[t - 1]) + scale (q[t] . u . k[t]) v[t]`` with its backward.

    o_early, v ``[B,T,H,V]``; q, k ``[B,T,H,K]`` (one dtype); u ``[H,K]`` (any float dtype; its gradient comes back
    in fp32 and autograd casts it); first ``[B*T]`` bool/int8, true at each sequence's first token (token 0 of every
    batch row included). With ``link`` (from ``tap``, whose outputs chunk_gla took), q, k, v and u get their
    gradients through ``tap`` instead. Returns o ``[B,T,H,V]`` in o_early's dtype."""
    if q.shape != k.shape or o_early.shape != v.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"o_early {tuple(o_early.shape)}: want q, k [B,T,H,K] and v, o_early [B,T,H,V]")
    if first.numel() != q.shape[0] * q.shape[1]:
        raise ValueError(f"first has {first.numel()} entries, want B*T = {q.shape[0] * q.shape[1]}")
    return _ShiftBonus.apply(o_early, q, k, v, u, first.to(torch.int8).contiguous(), float(scale), link)
