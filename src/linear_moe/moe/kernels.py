"""Triton kernels for the MoE layer's memory-bound steps: the SwiGLU (forward and backward, with the routing
weight folded in) and the gather-sum that combines each token's ``k`` expert rows; and, for the opt-in expert
backend ``fused_gather``, grouped GEMMs that read their token rows by index instead of from a gathered copy.

Imported lazily (only for CUDA tensors, or by tests under ``TRITON_INTERPRET=1`` on CPU), so the package
imports without Triton. The pure-PyTorch forms in ``swiglu.py`` and ``permute.py`` are the references.
Every kernel reads 16-bit or fp32 inputs, computes in fp32 and writes the output dtype. The SwiGLU kernels
index rows by stride, so gate and up (and their gradients) may be the two halves of one ``[M, 2H]`` tensor.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, w_ptr, h_ptr, M, H, stride_g, stride_u, stride_h,
                       HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < M
    mask = rmask[:, None] & (cols[None, :] < H)
    r64 = rows.to(tl.int64)[:, None]
    g = tl.load(g_ptr + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    if HAS_W:
        w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        h = h * w[:, None]
    tl.store(h_ptr + r64 * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, u_ptr, w_ptr, dh_ptr, dg_ptr, du_ptr, dw_ptr, h_ptr, M, H,
                       stride_g, stride_u, stride_dh, stride_dg, stride_du, stride_h, n_hblocks,
                       HAS_W: tl.constexpr, STORE_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < M
    mask = rmask[:, None] & (cols[None, :] < H)
    r64 = rows.to(tl.int64)[:, None]
    g = tl.load(g_ptr + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + r64 * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    a = g * s
    if STORE_H:  # the forward output again, for a weight gradient that did not keep it
        hw = a * u
        if HAS_W:
            hw = hw * tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
        tl.store(h_ptr + r64 * stride_h + cols[None, :], hw.to(h_ptr.dtype.element_ty), mask=mask)
    if HAS_W:
        w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        # one partial row sum per H block; the caller adds the (few) blocks: deterministic, no atomics
        tl.store(dw_ptr + rows.to(tl.int64) * n_hblocks + pid_h, tl.sum(dh * a * u, axis=1), mask=rmask)
        dh = dh * w[:, None]
    du = dh * a
    dg = dh * u * s * (1.0 + g * (1.0 - s))
    tl.store(dg_ptr + r64 * stride_dg + cols[None, :], dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + r64 * stride_du + cols[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_sum_kernel(src_ptr, idx_ptr, w_ptr, out_ptr, n_src, C, stride_src, stride_out,
                       K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(K):
        r = tl.load(idx_ptr + t * K + j).to(tl.int64)
        v = tl.load(src_ptr + r * stride_src + cols, mask=cmask & (r < n_src), other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + t * K + j).to(tl.float32)
        acc += v
    tl.store(out_ptr + t.to(tl.int64) * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


def _block(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), cap)


def _rows(t: torch.Tensor) -> torch.Tensor:
    # the kernels index rows by stride and columns densely
    return t if t.stride(-1) == 1 else t.contiguous()


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``silu(gate) * up (* weight[:, None])``: gate, up [M, H] (rows may be strided, e.g. the halves of one
    ``[M, 2H]`` buffer), weight [M] or None -> [M, H] in gate's dtype."""
    gate, up = _rows(gate), _rows(up)
    m, h = gate.shape
    out = torch.empty((m, h), device=gate.device, dtype=gate.dtype)
    if m == 0:
        return out
    bh = _block(h, 1024)
    bm = max(1, 2048 // bh)
    grid = (triton.cdiv(m, bm), triton.cdiv(h, bh))
    _swiglu_fwd_kernel[grid](gate, up, weight if weight is not None else gate, out, m, h,
                             gate.stride(0), up.stride(0), out.stride(0),
                             HAS_W=weight is not None, BLOCK_M=bm, BLOCK_H=bh)
    return out


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None, grad: torch.Tensor,
                    want_output: bool = False):
    """Gradients of ``swiglu_forward``: -> (grad_gate [M, H], grad_up [M, H], grad_weight [M] fp32 or None,
    the forward output [M, H] recomputed in the same pass when ``want_output``, else None)."""
    gate, up = _rows(gate), _rows(up)
    dg = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    du = torch.empty(up.shape, device=up.device, dtype=up.dtype)
    dw, out = _swiglu_backward_into(gate, up, weight, grad, dg, du, want_output)
    return dg, du, dw, out


def swiglu_backward_gate_up(gate_up: torch.Tensor, weight: torch.Tensor | None, grad: torch.Tensor,
                            want_output: bool = False):
    """``swiglu_backward`` for gate and up stored side by side: gate_up [M, 2H] (gate columns first) ->
    (grad_gate_up [M, 2H] in the same layout, grad_weight [M] fp32 or None, the output [M, H] or None)."""
    gate_up = _rows(gate_up)
    h = gate_up.shape[1] // 2
    dgu = torch.empty(gate_up.shape, device=gate_up.device, dtype=gate_up.dtype)
    dw, out = _swiglu_backward_into(gate_up[:, :h], gate_up[:, h:], weight, grad, dgu[:, :h], dgu[:, h:], want_output)
    return dgu, dw, out


def _swiglu_backward_into(gate, up, weight, grad, dg, du, want_output):
    # gate, up, dg, du: [M, H] with unit column stride; rows may be strided (halves of a [M, 2H] buffer)
    grad = _rows(grad)
    m, h = gate.shape
    out = torch.empty((m, h), device=gate.device, dtype=gate.dtype) if want_output else None
    bh = _block(h, 1024)
    bm = max(1, 2048 // bh)
    n_hblocks = triton.cdiv(h, bh)
    dw = torch.empty((m, n_hblocks), device=gate.device, dtype=torch.float32) if weight is not None else None
    if m > 0:
        grid = (triton.cdiv(m, bm), n_hblocks)
        _swiglu_bwd_kernel[grid](gate, up, weight if weight is not None else gate, grad, dg, du,
                                 dw if dw is not None else gate, out if out is not None else gate, m, h,
                                 gate.stride(0), up.stride(0), grad.stride(0), dg.stride(0), du.stride(0),
                                 out.stride(0) if out is not None else 0, n_hblocks,
                                 HAS_W=weight is not None, STORE_H=want_output, BLOCK_M=bm, BLOCK_H=bh)
    return None if dw is None else dw.sum(1), out


def gather_sum(src: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = sum_j weight[t, j] * src[index[t, j]]`` where rows ``index >= len(src)`` count as zero.

    src [n, C], index [N, k] int64, weight [N, k] or None (all ones) -> [N, C] in src's dtype.
    """
    src = _rows(src)
    index = index.contiguous()
    n_tok, k = index.shape
    c = src.shape[1]
    out = torch.empty((n_tok, c), device=src.device, dtype=src.dtype)
    if n_tok == 0 or c == 0:
        return out
    bc = _block(c, 2048)
    grid = (n_tok, triton.cdiv(c, bc))
    _gather_sum_kernel[grid](src, index, weight.contiguous() if weight is not None else src, out, src.shape[0], c,
                             src.stride(0), out.stride(0), K=k, HAS_W=weight is not None, BLOCK_C=bc)
    return out


# --- grouped GEMMs with gathered rows (expert backend "fused_gather") -------------------------------------------
# Rows are sorted by expert (offs: cumulative row ends, int32, on the device): no host sync, so the launch grids
# are bounds (n / BM + E row tiles; programs past the last tile return).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter cannot time configs: one small one
_MM_CONFIGS = [triton.Config({"BM": 16, "BN": 16, "BK": 16})] if _INTERPRET else [
    triton.Config({"BM": bm, "BN": bn, "BK": 64}, num_warps=w, num_stages=st)
    for bm, bn, w, st in [(128, 128, 8, 3), (128, 256, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4), (128, 64, 4, 4)]]
_WGRAD_CONFIGS = [triton.Config({"BI": 16, "BJ": 16, "BK": 16})] if _INTERPRET else [
    triton.Config({"BI": bi, "BJ": bj, "BK": 64}, num_warps=w, num_stages=st)
    for bi, bj, w, st in [(128, 128, 8, 3), (128, 256, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4)]]


@triton.autotune(configs=_MM_CONFIGS, key=["C", "N_OUT", "E", "GATHER"])
@triton.jit
def _gathered_grouped_mm_kernel(x, token, offs, w, out, stride_we, stride_wo, stride_wi, C: tl.constexpr,
                                N_OUT: tl.constexpr, E: tl.constexpr, GATHER: tl.constexpr, BM: tl.constexpr,
                                BN: tl.constexpr, BK: tl.constexpr):
    """out[r] = x[token[r]] @ w[e(r)]^T (x[r] without GATHER) for the rows r of expert e.

    Program (n tile, m tile): the m tiles are numbered across experts (expert e owns ceil(count_e / BM) of them,
    found by walking offs). The n tiles are the fast grid axis, so consecutive programs reuse one row tile from
    L2 and walk one expert's weights. w may be a strided view (the down projection read transposed)."""
    pid_n = tl.program_id(0)
    tile = tl.program_id(1)
    expert = -1
    start = 0
    end = 0
    prev = 0
    tiles_before = 0
    for e in range(E):
        end_e = tl.load(offs + e).to(tl.int32)
        n_tiles = (end_e - prev + BM - 1) // BM
        hit = (tile >= tiles_before) & (tile < tiles_before + n_tiles)
        expert = tl.where(hit, e, expert)
        start = tl.where(hit, prev + (tile - tiles_before) * BM, start)
        end = tl.where(hit, end_e, end)
        tiles_before += n_tiles
        prev = end_e
    if expert < 0:
        return
    rows = start + tl.arange(0, BM)
    m_rows = rows < end
    if GATHER:
        src = tl.load(token + rows, mask=m_rows, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    m_cols = cols < N_OUT
    w_e = w + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wo
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, C, BK):
        ks = k0 + tl.arange(0, BK)
        m_k = ks < C
        a = tl.load(x + src[:, None] * C + ks[None, :], mask=m_rows[:, None] & m_k[None, :], other=0.0)
        b = tl.load(w_e + ks[:, None] * stride_wi, mask=m_k[:, None] & m_cols[None, :], other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc)
    dst = out + rows.to(tl.int64)[:, None] * N_OUT + cols[None, :]
    tl.store(dst, acc.to(out.dtype.element_ty), mask=m_rows[:, None] & m_cols[None, :])


@triton.autotune(configs=_WGRAD_CONFIGS, key=["C", "N_OUT"])
@triton.jit
def _gathered_grouped_wgrad_kernel(g, x, token, offs, dw, stride_de, stride_di, stride_dj, C: tl.constexpr,
                                   N_OUT: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    """dw[e] = g[rows of e]^T @ x[token[rows of e]]: one [BI, BJ] tile of one expert per program, looping over
    that expert's rows (an empty expert writes zeros). dw may be a strided view (a transposed weight gradient)."""
    n_j: tl.constexpr = (C + BJ - 1) // BJ
    i0 = (tl.program_id(0) // n_j) * BI
    j0 = (tl.program_id(0) % n_j) * BJ
    e = tl.program_id(1)
    end = tl.load(offs + e).to(tl.int32)
    start = tl.where(e > 0, tl.load(offs + e - 1, mask=e > 0, other=0).to(tl.int32), 0)
    ii = i0 + tl.arange(0, BI)
    jj = j0 + tl.arange(0, BJ)
    m_i = ii < N_OUT
    m_j = jj < C
    acc = tl.zeros([BI, BJ], dtype=tl.float32)
    for r0 in range(start, end, BK):
        rows = r0 + tl.arange(0, BK)
        m_r = rows < end
        src = tl.load(token + rows, mask=m_r, other=0).to(tl.int64)
        g_t = tl.load(g + rows.to(tl.int64)[None, :] * N_OUT + ii[:, None], mask=m_i[:, None] & m_r[None, :],
                      other=0.0)
        x_t = tl.load(x + src[:, None] * C + jj[None, :], mask=m_r[:, None] & m_j[None, :], other=0.0)
        acc = tl.dot(g_t, x_t.to(g_t.dtype), acc)
    dst = dw + e.to(tl.int64) * stride_de + ii[:, None].to(tl.int64) * stride_di + jj[None, :].to(tl.int64) * stride_dj
    tl.store(dst, acc.to(dw.dtype.element_ty), mask=m_i[:, None] & m_j[None, :])


def gathered_grouped_mm(x: torch.Tensor, token: torch.Tensor | None, offs: torch.Tensor,
                        w: torch.Tensor) -> torch.Tensor:
    """Per-expert ``x[token[r]] @ w[e]^T`` over rows sorted by expert, without the gathered ``[n, C]`` copy.

    x [N, C] (contiguous rows), token [n] int (source row of each sorted row; None: row r is x[r], n = N), offs
    [E] int32 cumulative row ends, w [E, out, C] (any strides: a transposed view reads the other layout) ->
    [n, out] in x's dtype, accumulated in fp32."""
    E, n_out, C = w.shape
    x = x.contiguous()
    n = x.shape[0] if token is None else token.numel()
    out = x.new_empty(n, n_out)
    if n == 0:
        return out
    grid = lambda meta: (triton.cdiv(n_out, meta["BN"]), triton.cdiv(n, meta["BM"]) + E)  # noqa: E731
    _gathered_grouped_mm_kernel[grid](x, token if token is not None else offs, offs, w, out, w.stride(0),
                                      w.stride(1), w.stride(2), C=C, N_OUT=n_out, E=E, GATHER=token is not None)
    return out


def gathered_grouped_wgrad(g: torch.Tensor, x: torch.Tensor, token: torch.Tensor, offs: torch.Tensor,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-expert ``g[rows of e]^T @ x[token[rows of e]]`` (a weight gradient) without the gathered copy of x.

    g [n, out] (the sorted rows' output gradients), x [N, C], token [n], offs [E] -> [E, out, C] in g's dtype,
    written into ``out`` when given (any strides, e.g. the transposed view of a ``[E, C, out]`` gradient)."""
    g, x = g.contiguous(), x.contiguous()
    n_out, C, E = g.shape[1], x.shape[1], offs.numel()
    dw = g.new_empty(E, n_out, C) if out is None else out
    grid = lambda meta: (triton.cdiv(n_out, meta["BI"]) * triton.cdiv(C, meta["BJ"]), E)  # noqa: E731
    _gathered_grouped_wgrad_kernel[grid](g, x, token, offs, dw, dw.stride(0), dw.stride(1), dw.stride(2), C=C,
                                         N_OUT=n_out)
    return dw
