"""Backward step of the chunked (gated) linear-attention kernels: dq, dk, dw, dg of one chunk.

Drop-in for fla-core 0.6.0's `fla.ops.common.chunk_o.chunk_bwd_dqkwg` (same arguments, same
outputs), written so that it compiles correctly on Hopper with Triton 3.4 - 3.7.0.

Why fla's version is wrong there (fla issue #640): it forms the intra-chunk score gradient
ds[t, s] = do_t . v_s with `tl.dot` (the result sits in the wgmma accumulator register layout),
casts it to 16 bit and feeds `tl.trans(ds)` into a second `tl.dot` for dk. Those Triton releases
mis-lower a transpose of a tensor in that accumulator layout when it becomes a wgmma operand.
Here the transposed scores ds^T[s, t] = v_s . do_t are accumulated by their own `tl.dot` with
the loaded (not computed) tiles transposed, so no matmul result is ever transposed. The price is
one extra [BT, BV] x [BV, BT] product per value block, ~20% of this step's matmul work.

Math per chunk (positions t, s inside the chunk, b = cumulative log2 gate inside the chunk,
b_last its value at the chunk's last valid row, h the state entering the chunk, dh the gradient
of the state leaving it, s <= t causal):
    dq_t = scale * (2^b_t do_t h^T + sum_{s<=t} ds[t,s] 2^(b_t-b_s) k_s)
    dk_s = 2^(b_last-b_s) v_s dh^T + scale * sum_{t>=s} ds[t,s] 2^(b_t-b_s) q_t
    dw   = -dv h^T                                        (delta rule only)
    dg_t = q_t . dq_t - k_t . dk_t  (+ 2^b_last <h, dh> + sum_s k_s . dk_s^state at the last row)
dg is the gradient w.r.t. the cumulative gate in natural-log units (fla pre-scales g by 1/ln 2);
the caller applies the reverse cumulative sum.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# 0: no gate (linear attention, delta rule), 1: per-position gate g, 2: constant per-head g_gamma
_NO_GATE, _GATE_G, _GATE_GAMMA = 0, 1, 2


# 8 warps only. With 4 warps (one warpgroup: the [BT, BT] products lower to wgmma) the H100 with Triton 3.6 computed
# dk, hence dg, wrongly in bf16 (relative error ~0.95 at K = 16 and 32 while dq was right) and, timed by the
# autotuner, made illegal memory accesses at K = 16 - 128; every 8-warp config was right to bf16 rounding
# (benchmarks/dqkwg_probe.py, 2026-11-25 s9). The 8-warp configs were also the autotuner's pick where it could
# choose (23 vs 17 us at GDN's shapes), so nothing is lost.
_CONFIGS = [triton.Config({}, num_warps=8, num_stages=s) for s in (2, 3)]
if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU interpreter cannot time configs
    _CONFIGS = _CONFIGS[:1]


@triton.autotune(
    configs=_CONFIGS,
    key=["H", "HV", "K", "V", "BT", "BK", "BV", "GATE", "USE_DW", "STATE_V_FIRST"],
)
@triton.jit(do_not_specialize=["T"])
def _dqkwg_kernel(q, k, v, g, g_gamma, h, do, dh, dq, dk, dw, dv, dg, cu_seqlens, chunk_indices,
                  scale, T, B: tl.constexpr, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  GATE: tl.constexpr, USE_DW: tl.constexpr, STATE_V_FIRST: tl.constexpr,
                  IS_VARLEN: tl.constexpr):
    NK: tl.constexpr = (K + BK - 1) // BK
    i_k = tl.program_id(0) % NK
    i_t = tl.program_id(0) // NK
    i_b = tl.program_id(1) // HV
    i_h = tl.program_id(1) % HV
    i_hq = i_h // (HV // H)  # grouped heads: HV value heads share H query/key heads
    if IS_VARLEN:
        i_chunk = i_t  # global chunk index into h / dh
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        if i_n < 0:  # padding rows of graph-captured chunk tables
            return
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        i_chunk = i_b * tl.cdiv(T, BT) + i_t
        bos = i_b.to(tl.int64) * T
        seq_len = T

    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < seq_len
    rows = bos + o_t.to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    state_off = (i_chunk.to(tl.int64) * HV + i_h) * (K * V)

    b_ds = tl.zeros([BT, BT], dtype=tl.float32)   # ds[t, s] = do_t . v_s
    b_dst = tl.zeros([BT, BT], dtype=tl.float32)  # ds^T[s, t], its own product (see docstring)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        tv_off = (rows[:, None] * HV + i_h) * V + o_v[None, :]
        b_v = tl.load(v + tv_off, mask=m_tv, other=0.0)
        b_do = tl.load(do + tv_off, mask=m_tv, other=0.0)
        if STATE_V_FIRST:
            vk_off = state_off + o_v[:, None] * K + o_k[None, :]
        else:
            vk_off = state_off + o_v[:, None] + o_k[None, :] * V
        m_vk = m_v[:, None] & m_k[None, :]
        b_h = tl.load(h + vk_off, mask=m_vk, other=0.0)    # [BV, BK]
        b_dh = tl.load(dh + vk_off, mask=m_vk, other=0.0)
        if GATE == 1:
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=0)
        b_ds = tl.dot(b_do, tl.trans(b_v), b_ds)
        b_dst = tl.dot(b_v, tl.trans(b_do), b_dst)
        b_dq = tl.dot(b_do, b_h.to(b_do.dtype), b_dq)
        b_dk = tl.dot(b_v, b_dh.to(b_v.dtype), b_dk)
        if USE_DW:
            b_dv = tl.load(dv + tv_off, mask=m_tv, other=0.0)
            b_dw = tl.dot(b_dv.to(b_v.dtype), b_h.to(b_v.dtype), b_dw)

    m_tk = m_t[:, None] & m_k[None, :]
    tk_off = (rows[:, None] * HV + i_h) * K + o_k[None, :]
    if USE_DW:
        tl.store(dw + tk_off, (-b_dw).to(dw.dtype.element_ty), mask=m_tk)

    qk_off = (rows[:, None] * H + i_hq) * K + o_k[None, :]
    b_q = tl.load(q + qk_off, mask=m_tk, other=0.0)
    b_k = tl.load(k + qk_off, mask=m_tk, other=0.0)
    m_ts = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]  # [t, s], s <= t
    m_st = (o_t[:, None] <= o_t[None, :]) & m_t[:, None] & m_t[None, :]  # [s, t], s <= t
    i_last = tl.minimum(i_t * BT + BT, seq_len) - 1
    if GATE == 0:
        b_dq = b_dq * scale
        b_ds = tl.where(m_ts, b_ds, 0.0) * scale
        b_dst = tl.where(m_st, b_dst, 0.0) * scale
    else:
        if GATE == 1:
            b_g = tl.load(g + rows * HV + i_h, mask=m_t, other=0.0).to(tl.float32)
            b_g_last = tl.load(g + (bos + i_last) * HV + i_h).to(tl.float32)
        else:
            b_gamma = tl.load(g_gamma + i_h).to(tl.float32)
            b_g = b_gamma * (tl.arange(0, BT) + 1).to(tl.float32)
            b_g_last = b_gamma * (i_last - i_t * BT + 1).to(tl.float32)
        b_dq = b_dq * tl.exp2(b_g)[:, None] * scale
        b_dk = b_dk * tl.where(m_t, tl.exp2(b_g_last - b_g), 0.0)[:, None]
        b_ds = tl.where(m_ts, b_ds * tl.exp2(b_g[:, None] - b_g[None, :]), 0.0) * scale
        b_dst = tl.where(m_st, b_dst * tl.exp2(b_g[None, :] - b_g[:, None]), 0.0) * scale
    if GATE == 1:
        # the last row's gate scales the whole carried state: <h, dh> and every state-path dk
        b_dg_last = tl.sum(b_hdh) * tl.exp2(b_g_last) + tl.sum(b_dk * b_k.to(tl.float32))
    b_dq = tl.dot(b_ds.to(b_k.dtype), b_k, b_dq)
    b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk)
    tl.store(dq + tk_off, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + tk_off, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    if GATE == 1:
        b_dg = tl.sum(b_dq * b_q.to(tl.float32), axis=1) - tl.sum(b_dk * b_k.to(tl.float32), axis=1)
        b_dg = tl.where(o_t == i_last, b_dg + b_dg_last, b_dg)
        tl.store(dg + i_k.to(tl.int64) * (B * T * HV) + rows * HV + i_h, b_dg, mask=m_t)


def chunk_indices_from_cu_seqlens(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[num_chunks, 2] table of (sequence index, chunk index inside it) for packed sequences."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    rows = [(n, c) for n, length in enumerate(lens) for c in range(-(-length // chunk_size))]
    return torch.tensor(rows, dtype=cu_seqlens.dtype, device=cu_seqlens.device).view(-1, 2)


def chunk_bwd_dqkwg(q, k, v, do, h, dh, w=None, g=None, g_gamma=None, dv=None, scale=None,
                    state_v_first=False, cu_seqlens=None, chunk_size=64, chunk_indices=None):
    """Same contract as fla 0.6.0 `chunk_bwd_dqkwg`.

    q, k `[B, T, H, K]`; v, do, dv `[B, T, HV, V]`; h, dh `[num_chunks, HV, K, V]` (`[.., V, K]`
    when state_v_first); g `[B, T, HV]` cumulative log2 gate inside each chunk; g_gamma `[HV]`
    log2 per-step gate; w `[B, T, HV, K]` (only its shape/dtype is used). Returns
    (dq `[B,T,H,K]`, dk `[B,T,H,K]`, dw or None, dg `[B,T,HV]` float32 or None).
    """
    B, T, H, K = k.shape
    V, HV = v.shape[-1], v.shape[2]
    BT = chunk_size
    if scale is None:
        scale = K ** -0.5
    if cu_seqlens is not None and chunk_indices is None:
        chunk_indices = chunk_indices_from_cu_seqlens(cu_seqlens, BT)
    NT = triton.cdiv(T, BT) if cu_seqlens is None else len(chunk_indices)
    # a [BT, 128] fp32 pair of accumulators fits in registers with 8 warps; wider K is split
    BK = min(max(triton.next_power_of_2(K), 16), 128)
    BV = min(max(triton.next_power_of_2(V), 16), 64)
    NK = triton.cdiv(K, BK)
    gate = _GATE_G if g is not None else (_GATE_GAMMA if g_gamma is not None else _NO_GATE)
    dq = q.new_empty(B, T, HV, K)
    dk = k.new_empty(B, T, HV, K)
    dw = torch.empty_like(w) if w is not None else None
    dg = torch.empty(NK, B, T, HV, dtype=torch.float32, device=q.device) if gate == _GATE_G else None
    _dqkwg_kernel[(NK * NT, B * HV)](
        q, k, v, g, g_gamma, h, do, dh, dq, dk, dw, dv, dg, cu_seqlens, chunk_indices, scale, T,
        B=B, H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, BV=BV, GATE=gate, USE_DW=w is not None,
        STATE_V_FIRST=state_v_first, IS_VARLEN=cu_seqlens is not None)
    if H != HV:
        dq = dq.view(B, T, H, HV // H, K).sum(3)
        dk = dk.view(B, T, H, HV // H, K).sum(3)
    if dg is not None:
        dg = dg.sum(0)
    return dq, dk, dw, dg
