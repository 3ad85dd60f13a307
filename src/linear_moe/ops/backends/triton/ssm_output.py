"""Triton kernels for ``ops.ssm_output``: ``out = rmsnorm_G((y + D x) * silu(z)) * w`` over ``[rows, C]``
(``C = H * P`` channels in ``G`` groups of ``C / G``), one program per (block of rows, group).

Forward: reads y, x, z once; writes out and ``r = rsqrt(mean(b^2) + eps)`` per (row, group) in fp32, where
``a = y + D x`` and ``b = a * silu(z)``. Backward: reads dout, y, x, z and r; with ``g = dout * w``:
``db = r g - b r^3 mean(b g)``, ``da = db silu(z)``, ``dz = db a silu'(z)``, ``dy = da``, ``dx = D da``, and
per-program partial sums of ``dw = dout b r`` and ``dD_c = da x`` over its rows (summed by the caller; dD then
per head). Imported lazily (CUDA tensors, or tests under ``TRITON_INTERPRET=1`` on CPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_row(y_ptr, x_ptr, z_ptr, d_ptr, row, g, cols, mask, C, CG: tl.constexpr, P: tl.constexpr):
    """This row's group: a = y + D x, z, x (fp32), and the channel offsets."""
    ch = g * CG + cols
    off = row.to(tl.int64) * C + ch
    y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + ch // P, mask=mask, other=0.0).to(tl.float32)
    return y + d * x, z, x, d, ch, off


@triton.jit
def _fwd_kernel(y_ptr, x_ptr, z_ptr, d_ptr, w_ptr, out_ptr, r_ptr, n_rows, C, G, eps,
                CG: tl.constexpr, P: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    pid, g = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < CG
    w = tl.load(w_ptr + g * CG + cols, mask=mask, other=0.0).to(tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < n_rows:
            a, z, x, d, ch, off = _load_row(y_ptr, x_ptr, z_ptr, d_ptr, row, g, cols, mask, C, CG, P)
            b = a * z * tl.sigmoid(z)
            r = 1.0 / tl.sqrt(tl.sum(b * b, axis=0) / CG + eps)
            tl.store(out_ptr + off, (b * r * w).to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(r_ptr + row.to(tl.int64) * G + g, r)


@triton.jit
def _bwd_kernel(dout_ptr, y_ptr, x_ptr, z_ptr, d_ptr, w_ptr, r_ptr, dy_ptr, dx_ptr, dz_ptr, dw_part_ptr,
                dd_part_ptr, n_rows, C, G, CG: tl.constexpr, P: tl.constexpr, BLOCK_C: tl.constexpr,
                ROWS: tl.constexpr):
    pid, g = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < CG
    w = tl.load(w_ptr + g * CG + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    dd = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < n_rows:
            a, z, x, d, ch, off = _load_row(y_ptr, x_ptr, z_ptr, d_ptr, row, g, cols, mask, C, CG, P)
            sz = tl.sigmoid(z)
            silu = z * sz
            b = a * silu
            r = tl.load(r_ptr + row.to(tl.int64) * G + g)
            dout = tl.load(dout_ptr + off, mask=mask, other=0.0).to(tl.float32)
            gw = dout * w
            dw += dout * b * r
            db = r * gw - b * (r * r * r) * (tl.sum(b * gw, axis=0) / CG)
            da = db * silu
            dz = db * a * sz * (1.0 + z * (1.0 - sz))
            dd += da * x
            tl.store(dy_ptr + off, da.to(dy_ptr.dtype.element_ty), mask=mask)
            tl.store(dx_ptr + off, (da * d).to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    part = (pid.to(tl.int64) * C + g * CG + cols)
    tl.store(dw_part_ptr + part, dw, mask=mask)
    tl.store(dd_part_ptr + part, dd, mask=mask)


def _meta(n_rows: int, C: int, groups: int, P: int) -> tuple[tuple[int, int], dict]:
    cg = C // groups
    block = triton.next_power_of_2(cg)
    rows = 16  # rows per program: the backward's partial sums are [n_rows / 16, C] fp32
    return (triton.cdiv(n_rows, rows), groups), dict(CG=cg, P=P, BLOCK_C=block, ROWS=rows,
                                                     num_warps=8 if block >= 2048 else 4)


class _SSMOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, D, z, weight, groups, eps, out_dtype):
        B, T, H, P = y.shape
        C, n = H * P, B * T
        y, x, z = (t.contiguous() for t in (y, x, z))
        D, weight = D.float().contiguous(), weight.float().contiguous()
        out = torch.empty(B, T, C, dtype=out_dtype, device=y.device)
        r = torch.empty(n, groups, dtype=torch.float32, device=y.device)
        grid, meta = _meta(n, C, groups, P)
        _fwd_kernel[grid](y, x, z, D, weight, out, r, n, C, groups, eps, **meta)
        ctx.save_for_backward(y, x, z, D, weight, r)
        ctx.groups = groups
        return out

    @staticmethod
    def backward(ctx, dout):
        y, x, z, D, weight, r = ctx.saved_tensors
        B, T, H, P = y.shape
        C, n, groups = H * P, B * T, ctx.groups
        dout = dout.contiguous()
        dy, dx, dz = torch.empty_like(y), torch.empty_like(x), torch.empty_like(z)
        grid, meta = _meta(n, C, groups, P)
        dw_part = torch.empty(grid[0], C, dtype=torch.float32, device=y.device)
        dd_part = torch.empty(grid[0], C, dtype=torch.float32, device=y.device)
        _bwd_kernel[grid](dout, y, x, z, D, weight, r, dy, dx, dz, dw_part, dd_part, n, C, groups, **meta)
        dD = dd_part.sum(0).view(H, P).sum(-1)
        return dy, dx, dD, dz, dw_part.sum(0), None, None, None


def ssm_output(y, x, D, z, weight, groups: int, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """``ops.ssm_output`` with a gate and a norm (checked there): ``[B, T, H*P]`` in ``out_dtype``."""
    return _SSMOutput.apply(y, x, D, z, weight, int(groups), float(eps), out_dtype)
