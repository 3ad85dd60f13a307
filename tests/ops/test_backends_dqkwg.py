"""Our Triton chunk_bwd_dqkwg (the fla #640 fix) against a float64 autograd reference.

Runs on CUDA, or on CPU through Triton's interpreter (TRITON_INTERPRET=1, which
tests/conftest.py sets before Triton is imported) when Triton is installed; skips when Triton is absent (the usual CPU CI).
"""

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from linear_moe.ops.backends.triton.dqkwg import chunk_bwd_dqkwg  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _chunks(B, T, cu_seqlens, BT):
    """(batch row, start, end, global chunk index) for every chunk."""
    spans = ([(0, int(a), int(b)) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
             if cu_seqlens is not None else [(b, 0, T) for b in range(B)])
    out, n = [], 0
    for b, start, end in spans:
        for c in range(start, end, BT):
            out.append((b, c, min(c + BT, end), n))
            n += 1
    return out


def reference(q, k, v, do, h, dh, dv, g, g_gamma, scale, v_first, cu_seqlens, BT):
    """Autograd of one chunk's output + outgoing state, float64, chunk by chunk."""
    B, T, H, K = q.shape
    HV = v.shape[2]
    dq = torch.zeros(B, T, H, K, dtype=torch.float64)
    dk = torch.zeros_like(dq)
    dw = torch.zeros(B, T, HV, K, dtype=torch.float64)
    dg = torch.zeros(B, T, HV, dtype=torch.float64)
    f = lambda x: x.detach().double().cpu()  # noqa: E731
    q, k, v, do, h, dh, dv = map(f, (q, k, v, do, h, dh, dv))
    for b, s0, s1, n in _chunks(B, T, cu_seqlens, BT):
        L = s1 - s0
        for ih in range(HV):
            hq = ih // (HV // H)
            qc = q[b, s0:s1, hq].clone().requires_grad_()
            kc = k[b, s0:s1, hq].clone().requires_grad_()
            hc, dhc = (x[n, ih].T if v_first else x[n, ih] for x in (h, dh))
            if g is not None:
                bc = (f(g)[b, s0:s1, ih] * math.log(2)).requires_grad_()
            elif g_gamma is not None:
                bc = float(g_gamma[ih]) * math.log(2) * torch.arange(1, L + 1, dtype=torch.float64)
            else:
                bc = torch.zeros(L, dtype=torch.float64)
            causal = torch.ones(L, L, dtype=torch.bool).tril()
            decay = torch.where(causal, bc[:, None] - bc[None, :], -math.inf).exp()
            vc = v[b, s0:s1, ih]
            o = scale * ((qc * bc.exp()[:, None]) @ hc + ((qc @ kc.T) * decay) @ vc)
            h_next = bc[-1].exp() * hc + (kc * (bc[-1] - bc).exp()[:, None]).T @ vc
            loss = (o * do[b, s0:s1, ih]).sum() + (h_next * dhc).sum()
            grads = torch.autograd.grad(loss, [qc, kc] + ([bc] if g is not None else []))
            dq[b, s0:s1, hq] += grads[0]
            dk[b, s0:s1, hq] += grads[1]
            if g is not None:
                dg[b, s0:s1, ih] = grads[2]
            dw[b, s0:s1, ih] = -dv[b, s0:s1, ih] @ hc.T
    return dq, dk, dw, dg


def _rel(x, ref):
    assert not torch.isnan(x).any()
    return ((x.double().cpu() - ref).norm() / ref.norm()).item()


# (chunk, K, V): tiny under the interpreter; on GPU fla's real chunk 64 and the K = 64 / 128
# widths where the original kernel broke on Hopper
SIZES = [(16, 32, 16)] if DEVICE == "cpu" else [(64, 64, 64), (64, 128, 128)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("gate", ["g", "gamma", "none"])
@pytest.mark.parametrize("varlen", [False, True])
def test_dqkwg_matches_float64(gate, varlen, size):
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    BT, K, V = size
    H, HV = 1, 2
    if varlen:
        B, T, cu = 1, 3 * BT - 3, torch.tensor([0, BT - 3, 5 * BT // 2, 3 * BT - 3])
    else:
        B, T, cu = 2, 2 * BT + 5, None
    chunks = _chunks(B, T, cu, BT)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k = r(B, T, H, K), r(B, T, H, K)
    v, do, dv = r(B, T, HV, V), r(B, T, HV, V), r(B, T, HV, V)
    v_first = gate == "gamma"  # cover both state layouts
    sshape = (len(chunks), HV, V, K) if v_first else (len(chunks), HV, K, V)
    h, dh = r(*sshape), r(*sshape)
    g = g_gamma = None
    if gate == "g":  # cumulative log2 gate inside each chunk, as fla passes it
        g = torch.zeros(B, T, HV)
        step = -torch.rand(B, T, HV, generator=gen) * 0.3
        for b, s0, s1, _ in chunks:
            g[b, s0:s1] = step[b, s0:s1].cumsum(0)
    elif gate == "gamma":
        g_gamma = -torch.rand(HV, generator=gen) * 0.2
    w = torch.empty(B, T, HV, K)
    scale = K ** -0.5
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    out = chunk_bwd_dqkwg(*map(dev, (q, k, v, do, h, dh, w, g, g_gamma, dv)), scale=scale,
                          state_v_first=v_first, cu_seqlens=dev(cu), chunk_size=BT)
    ref = reference(q, k, v, do, h, dh, dv, g, g_gamma, scale, v_first, cu, BT)
    tol = 1e-5 if DEVICE == "cpu" else 5e-3  # the GPU runs fp32 dots in tf32
    for name, got, want in zip(["dq", "dk", "dw"], out[:3], ref[:3]):
        assert _rel(got, want) < tol, name
    if gate == "g":
        assert _rel(out[3], ref[3]) < tol
    else:
        assert out[3] is None


def test_plugs_into_fla_dispatch(monkeypatch):
    """fla's own dispatched `chunk_bwd_dqkwg` (what chunk_simple_gla / chunk_gated_delta_rule
    call in backward) reaches our kernel once the fix is installed and enabled."""
    pytest.importorskip("fla")
    import fla.ops.common.chunk_o as fla_chunk_o

    import linear_moe.ops.backends.triton.dqkwg as ours
    from linear_moe.ops.backends import fla as fla_backend

    calls = []
    real = ours.chunk_bwd_dqkwg
    monkeypatch.setattr(ours, "chunk_bwd_dqkwg", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fla_backend.use_our_dqkwg(True)
    try:
        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        B, T, H, K, V, BT = 1, 40, 2, 32, 16, 16
        r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
        q, k, v, do = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V), r(B, T, H, V)
        h, dh = r(3, H, K, V), r(3, H, K, V)
        g = (-torch.rand(B, T, H, generator=gen) * 0.3)
        for s0 in range(0, T, BT):
            g[:, s0:s0 + BT] = g[:, s0:s0 + BT].cumsum(1)
        dev = lambda x: x.to(DEVICE)  # noqa: E731
        dq, dk, dw, dg = fla_chunk_o.chunk_bwd_dqkwg(*map(dev, (q, k, v, do, h, dh)), g=dev(g),
                                                     scale=K ** -0.5, chunk_size=BT)
    finally:
        fla_backend.use_our_dqkwg(False)
    assert calls, "fla's dispatch did not call linear-moe's kernel"
    ref = reference(q, k, v, do, h, dh, torch.zeros_like(v), g, None, K ** -0.5, False, None, BT)
    tol = 1e-5 if DEVICE == "cpu" else 5e-3
    assert _rel(dq, ref[0]) < tol and _rel(dk, ref[1]) < tol and _rel(dg, ref[3]) < tol
    assert dw is None


def scalar_gate_inputs(gen, K, dtype, B=2, T=150, H=1, HV=2, V=64, BT=64):
    """Dense inputs with a scalar gate (cumulated inside each chunk, as fla passes it), rounded to ``dtype`` and
    held in fp32 (the values the kernel and the reference both see): (q, k, v, do, h, dh, g)."""
    chunks = _chunks(B, T, None, BT)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype).float()  # noqa: E731
    q, k, v, do = r(B, T, H, K), r(B, T, H, K), r(B, T, HV, V), r(B, T, HV, V)
    h, dh = r(len(chunks), HV, K, V), r(len(chunks), HV, K, V)
    g = torch.zeros(B, T, HV)
    step = -torch.rand(B, T, HV, generator=gen) * 0.3
    for b, s0, s1, _ in chunks:
        g[b, s0:s1] = step[b, s0:s1].cumsum(0)
    return q, k, v, do, h, dh, g


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tiles on the GPU (the interpreter's bf16 is not the GPU's)")
@pytest.mark.parametrize("heads", [(1, 2), (2, 2)], ids=["grouped", "equal"])
@pytest.mark.parametrize("K", [16, 32, 64, 128])
def test_dqkwg_bf16_on_cuda_every_config(K, heads, monkeypatch):
    """bf16 at the key widths the ops send here (>= ``backends.DQKWG_MIN_K_DIM``), scalar gate, a partial last chunk,
    grouped and one-to-one value heads, against the float64 reference on the same bf16-rounded inputs: once per
    launch config of the autotune list, since the autotuner's pick depends on timing (the 4-warp configs once in
    that list got dk wrong in bf16 on the H100 and faulted while being timed)."""
    import linear_moe.ops.backends.triton.dqkwg as dq

    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    H, HV = heads
    q, k, v, do, h, dh, g = scalar_gate_inputs(gen, K, torch.bfloat16, H=H, HV=HV)
    ref = reference(q, k, v, do, h, dh, torch.zeros_like(v), g, None, K ** -0.5, False, None, 64)
    bf = lambda x: x.cuda().bfloat16()  # noqa: E731
    for config in dq._CONFIGS:
        monkeypatch.setattr(dq._dqkwg_kernel, "configs", [config])  # one config: run as is, no timing
        out = chunk_bwd_dqkwg(*map(bf, (q, k, v, do, h, dh)), g=g.cuda(), scale=K ** -0.5, chunk_size=64)
        torch.cuda.synchronize()
        for name, got, want in zip(["dq", "dk", "dg"], (out[0], out[1], out[3]), (ref[0], ref[1], ref[3])):
            assert _rel(got.float(), want) < 2e-2, (name, str(config))
