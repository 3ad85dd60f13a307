"""`ops.gsa` (gated slot attention) against the float64 loop over its equations: outputs, both final states and
the gradients of every input, chunked and step by step, packed sequences, decoding, bad inputs, and which
backend it picks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linear_moe import ops
from linear_moe.ops import backends
from ops_testing import assert_close_with_grads, generator, grads_of, randn, reference, rel_err, time_slice


def gsa_inputs(g, B=2, T=37, H=2, K=8, V=6, M=5, with_state=True):
    log_decay = F.logsigmoid(randn(g, B, T, H, M) + 2.0) / 4  # GSA's gate with its logit normaliser
    args = dict(q=randn(g, B, T, H, K), k=randn(g, B, T, H, K), v=randn(g, B, T, H, V),
                s=torch.rand(B, T, H, M, generator=g), log_decay=log_decay)
    if with_state:
        args["initial_state"] = (randn(g, B, H, K, M) * 0.3, randn(g, B, H, M, V))
    return args


def _flat(fn):
    """``fn(**args)`` with the state pair split into separate tensors (outputs) and arguments (``hk0``, ``hv0``), so
    ``grads_of`` sees every output and the gradient of each initial state."""
    def run(hk0=None, hv0=None, **args):
        state = None if hk0 is None else (hk0, hv0)
        o, (hk, hv) = fn(**args, initial_state=state)
        return o, hk, hv
    return run


def _split(args):
    out = {n: x for n, x in args.items() if n != "initial_state"}
    if args.get("initial_state") is not None:
        out["hk0"], out["hv0"] = args["initial_state"]
    return out


@pytest.mark.parametrize("mode,chunk_size", [("chunk", 16), ("chunk", 64), ("chunk", 10), ("recurrent", 64)])
@pytest.mark.parametrize("with_state", [True, False])
def test_matches_reference_with_gradients(mode, chunk_size, with_state):
    g = generator()
    args = _split(gsa_inputs(g, with_state=with_state))
    weights = [randn(g, 2, 37, 2, 6), randn(g, 2, 2, 8, 5), randn(g, 2, 2, 5, 6)]
    got = grads_of(_flat(lambda **a: ops.gsa(**a, scale=0.7, output_final_state=True, mode=mode,
                                             chunk_size=chunk_size, backend="torch")), args, weights)
    ref = grads_of(_flat(lambda **a: reference.gsa_ref(**a, scale=0.7)), {n: x.double() for n, x in args.items()},
                   weights)
    names = {"q", "k", "v", "s", "log_decay"} | ({"hk0", "hv0"} if with_state else set())
    assert_close_with_grads(got, ref, 1e-4, f"{mode}/{chunk_size}", names=names)


def test_default_scale_is_inverse_sqrt_key_dim():
    args = gsa_inputs(generator(), T=9, with_state=False)
    o, _ = ops.gsa(**args, backend="torch")
    ref, _ = reference.gsa_ref(**args, scale=8 ** -0.5)
    assert rel_err(o, ref) < 1e-5


def test_packed_sequences_equal_each_sequence_alone():
    g = generator()
    cu = torch.tensor([0, 11, 11, 30, 41])  # an empty sequence too
    N, T = 4, 41
    args = gsa_inputs(g, B=1, T=T, with_state=False)
    state = (randn(g, N, 2, 8, 5) * 0.3, randn(g, N, 2, 5, 6))
    o, (hk, hv) = ops.gsa(**args, initial_state=state, output_final_state=True, cu_seqlens=cu, chunk_size=8,
                          backend="torch")
    for n in range(N):
        lo, hi = int(cu[n]), int(cu[n + 1])
        ref_o, (ref_hk, ref_hv) = reference.gsa_ref(**time_slice(args, lo, hi),
                                                    initial_state=(state[0][n:n + 1], state[1][n:n + 1]))
        if hi > lo:
            assert rel_err(o[:, lo:hi], ref_o) < 1e-5, f"sequence {n}"
        assert rel_err(hk[n:n + 1], ref_hk) < 1e-5 and rel_err(hv[n:n + 1], ref_hv) < 1e-5, f"state of {n}"


def test_decode_steps_equal_the_full_form():
    args = gsa_inputs(generator(), T=12)
    full, (hk, hv) = ops.gsa(**args, output_final_state=True, mode="chunk", chunk_size=4, backend="torch")
    state = args["initial_state"]
    for t in range(12):
        step = {n: x[:, t:t + 1] for n, x in args.items() if n != "initial_state"}
        o, state = ops.gsa(**step, initial_state=state, output_final_state=True, mode="recurrent", backend="torch")
        assert rel_err(o, full[:, t:t + 1]) < 1e-5, f"token {t}"
    assert rel_err(state[0], hk) < 1e-5 and rel_err(state[1], hv) < 1e-5


@pytest.mark.parametrize("change,message", [
    (dict(s=torch.rand(2, 37, 2)), r"s must have shape \[B, T, H, M\]"),
    (dict(log_decay=torch.zeros(2, 37, 2, 4)), r"log_decay must have shape \[B, T, H, M\] like s = \(2, 37, 2, 5\)"),
    (dict(initial_state=torch.zeros(2, 2, 8, 5)), "initial_state must be a pair"),
    (dict(initial_state=(torch.zeros(2, 2, 5, 8), torch.zeros(2, 2, 5, 6))), r"initial_state\[0\] .*\(2, 2, 8, 5\)"),
    (dict(initial_state=(torch.zeros(2, 2, 8, 5), torch.zeros(2, 2, 6, 5))), r"initial_state\[1\] .*\(2, 2, 5, 6\)"),
    (dict(mode="fast"), "mode='fast' is unknown"),
])
def test_bad_inputs_name_the_value(change, message):
    args = {**gsa_inputs(generator()), **change}
    with pytest.raises(ValueError, match=message):
        ops.gsa(**args)


def test_backend_choice():
    """CPU runs the torch form; a forced fla refuses with the reason; on CUDA 16-bit odd widths keep fla away."""
    args = gsa_inputs(generator(), T=5, with_state=False)
    with pytest.raises(RuntimeError, match="kernel backend 'fla' cannot run gsa: fla needs a CUDA device"):
        ops.gsa(**args, backend="fla")
    assert backends.resolve_backend("gsa", None, "cpu", torch.float32, m_dim=64) == "torch"
    reason = backends.why_not("fla", "gsa", torch.device("cpu"), torch.bfloat16, k_dim=8, v_dim=6, m_dim=5)
    assert reason.startswith("fla needs a CUDA device")


def test_odd_widths_refused_for_fla_in_16_bit(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "fla_version", lambda: "0.6.0")
    monkeypatch.setattr(backends, "triton_version", lambda: "3.6.0")
    cuda = torch.device("cuda")
    assert backends.why_not("fla", "gsa", cuda, torch.bfloat16, k_dim=64, v_dim=64, m_dim=64) is None
    assert backends.why_not("fla", "gsa", cuda, torch.float32, k_dim=63, v_dim=64, m_dim=5, requires_grad=False) is None
    assert backends.why_not("fla", "gsa", cuda, torch.bfloat16, k_dim=64, v_dim=64, m_dim=5) == (
        "fla's 16-bit chunk_gsa needs even head and slot widths, got m_dim=5")
    assert "m_dim=300" in backends.why_not("fla", "gsa", cuda, torch.bfloat16, k_dim=64, v_dim=64, m_dim=300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eight_slots_or_fewer_train_off_fla(monkeypatch, dtype):
    """fla's chunk_gsa backward fails to compile at 8 slots (tl.dot needs 16-wide tiles; the H100, s9): training
    takes the torch form there, inference keeps fla, and 9 slots (a 16-wide tile, masked) keep fla."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "fla_version", lambda: "0.6.0")
    monkeypatch.setattr(backends, "triton_version", lambda: "3.6.0")
    dims = dict(k_dim=32, v_dim=32)
    assert backends.resolve_backend("gsa", None, "cuda", dtype, requires_grad=True, m_dim=8, **dims) == "torch"
    assert backends.resolve_backend("gsa", None, "cuda", dtype, requires_grad=False, m_dim=8, **dims) == "fla"
    assert backends.resolve_backend("gsa", None, "cuda", dtype, requires_grad=True, m_dim=10, **dims) == "fla"
    with pytest.raises(RuntimeError, match="chunk_gsa backward needs more than 8 slots.*got m_dim=8"):
        backends.resolve_backend("gsa", "fla", "cuda", dtype, requires_grad=True, m_dim=8, **dims)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 5e-3), (torch.bfloat16, 5e-2)])
def test_fla_chunk_gsa_on_cuda_against_the_reference(dtype, tol):
    """fla's chunk_gsa (forced here; CUDA's pick) against the float64 loop: output, both states and every
    gradient, in fp32 (Triton's TF32 dots) and bf16, each error printed by name. Even widths, as fla's 16-bit
    path requires, and 16 slots (its backward's matmul tiles need more than 8)."""
    g = generator()
    args = _split(gsa_inputs(g, B=2, T=100, H=2, K=16, V=16, M=16))
    weights = [randn(g, 2, 100, 2, 16).double(), randn(g, 2, 2, 16, 16).double(), randn(g, 2, 2, 16, 16).double()]
    ref_outs, ref_grads = grads_of(_flat(lambda **a: reference.gsa_ref(**a, scale=0.25)),
                                   {n: x.double() for n, x in args.items()}, weights)
    cuda = {n: x.to("cuda", torch.float32 if n == "log_decay" else dtype) for n, x in args.items()}
    outs, grads = grads_of(_flat(lambda **a: ops.gsa(**a, scale=0.25, output_final_state=True, backend="fla")),
                           cuda, [w.cuda() for w in weights])
    errors = {f"output {i}": rel_err(o.double().cpu(), r) for i, (o, r) in enumerate(zip(outs, ref_outs))}
    errors.update({f"d{n}": rel_err(grads[n].double().cpu(), ref_grads[n]) for n in ref_grads})
    assert set(grads) == set(ref_grads)
    assert all(e < tol for e in errors.values()), errors
