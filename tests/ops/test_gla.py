"""`gla` (recurrent and chunked, dense and varlen) against the float64 loop in reference.py."""
from __future__ import annotations

import pytest
import torch

from linear_moe.ops import gla
from ops_testing import (
    GLA_KINDS, assert_close_with_grads, assert_varlen_equals_one_by_one, generator, gla_inputs, grads_of, randn,
    reference, rel_err, time_slice,
)

TOL = 1e-4


def _run(mode, chunk_size=64):
    def fn(**args):
        o, s = gla(**args, output_final_state=True, mode=mode, chunk_size=chunk_size)
        return o, s
    return fn


def _ref(**args):
    return reference.gla_ref(**args)


def _check_against_reference(args, forms, g):
    B, T, H, _ = args["q"].shape
    state_cols = args["v"].shape[-1] + int(args.get("normalize", False))
    weights = [randn(g, B, T, H, args["v"].shape[-1]).double(),
               randn(g, B, H, args["q"].shape[-1], state_cols).double()]
    expected = grads_of(_ref, args, weights)
    for mode, chunk_size in forms:
        actual = grads_of(_run(mode, chunk_size), args, weights)
        assert all(out.dtype == torch.float32 for out in actual[0])
        assert_close_with_grads(actual, expected, TOL, f"mode={mode} chunk_size={chunk_size}")


@pytest.mark.parametrize("kind", GLA_KINDS)
def test_gla_matches_reference_with_gradients(kind):
    g = generator()
    # T=37: chunk 16 and 7 leave a partial last chunk; 64 is longer than the sequence.
    forms = [("recurrent", 64), ("chunk", 16), ("chunk", 7), ("chunk", 64)]
    _check_against_reference(gla_inputs(kind, g, T=37), forms, g)


@pytest.mark.parametrize("kind", ["scalar", "vector", "vector_bonus"])
def test_gla_chunk_is_stable_under_strong_decay(kind):
    """Per-step log-decays down to about -60: exp(-G) over a 64-step chunk would overflow fp32."""
    g = generator()
    args = gla_inputs(kind, g, B=1, T=70, H=1, K=8, V=4, decay_scale=20.0)
    assert args["log_decay"].sum(1).min() < -200  # the cumulative decay really is far past fp32's range
    _check_against_reference(args, [("chunk", 64)], g)


@pytest.mark.parametrize("kind", GLA_KINDS)
@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_gla_varlen_equals_sequences_one_by_one(kind, mode):
    g = generator()
    cu = torch.tensor([0, 9, 9, 30, 44])  # includes an empty sequence
    N, T = len(cu) - 1, int(cu[-1])
    args = gla_inputs(kind, g, B=1, T=T, with_state=False)
    cols = args["v"].shape[-1] + int(kind == "normalize")
    h0 = randn(g, N, 2, 8, cols)
    h0 = h0.abs() + 0.1 if kind == "normalize" else h0
    o, s = gla(**args, initial_state=h0, output_final_state=True, cu_seqlens=cu, mode=mode, chunk_size=8)
    assert s.shape == (N, 2, 8, cols)
    assert_varlen_equals_one_by_one(o, s, cu, h0, reference.gla_ref, args, TOL)  # a constant decay [H] is not cut


def test_gla_varlen_chunk_gradients_match_reference():
    g = generator()
    cu = torch.tensor([0, 13, 40])
    args = gla_inputs("vector", g, B=1, T=40, with_state=False)
    h0 = randn(g, 2, 2, 8, 6)
    weights = [randn(g, 1, 40, 2, 6).double(), randn(g, 2, 2, 8, 6).double()]

    def varlen(**a):
        return gla(**a, initial_state=h0, output_final_state=True, cu_seqlens=cu, mode="chunk", chunk_size=8)

    def one_by_one(**a):
        parts = [reference.gla_ref(**time_slice(a, lo, hi), initial_state=h0[i:i + 1])
                 for i, (lo, hi) in enumerate([(0, 13), (13, 40)])]
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 0)

    assert_close_with_grads(grads_of(varlen, args, weights), grads_of(one_by_one, args, weights), TOL,
                            names={"q", "k", "v", "log_decay"})


@pytest.mark.parametrize("kind", GLA_KINDS)
def test_gla_decode_step_equals_last_row(kind):
    g = generator()
    args = gla_inputs(kind, g, T=21)
    o_full, s_full = gla(**args, output_final_state=True, mode="chunk", chunk_size=8)
    head = {n: (x[:, :-1] if isinstance(x, torch.Tensor) and x.dim() >= 3 and n != "initial_state" else x)
            for n, x in args.items()}
    _, s_prev = gla(**head, output_final_state=True, mode="chunk", chunk_size=8)
    last = {n: (x[:, -1:] if isinstance(x, torch.Tensor) and x.dim() >= 3 and n != "initial_state" else x)
            for n, x in args.items()}
    last["initial_state"] = s_prev
    o_step, s_step = gla(**last, output_final_state=True)  # mode="auto": T=1 runs the recurrent step
    assert rel_err(o_step, o_full[:, -1:]) < TOL
    assert rel_err(s_step, s_full) < TOL


def test_gla_varlen_decode_of_many_sequences():
    g = generator()
    N = 3
    args = gla_inputs("scalar", g, B=1, T=N, with_state=False)
    h0 = randn(g, N, 2, 8, 6)
    o, s = gla(**args, initial_state=h0, output_final_state=True, cu_seqlens=torch.arange(N + 1))
    ro, rs = reference.gla_ref(**{n: x.transpose(0, 1) for n, x in args.items()}, initial_state=h0)
    assert rel_err(o, ro.transpose(0, 1)) < TOL and rel_err(s, rs) < TOL


def test_gla_low_precision_inputs_keep_dtype_and_fp32_state():
    g = generator()
    args = {n: x.bfloat16() for n, x in gla_inputs("scalar", g, T=20).items()}
    o, s = gla(**args, output_final_state=True, mode="chunk", chunk_size=8)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    ro, rs = reference.gla_ref(**args)
    assert rel_err(o, ro) < 2e-2 and rel_err(s, rs) < 1e-4


def test_gla_without_final_state_returns_none():
    g = generator()
    o, s = gla(**gla_inputs("none", g, T=5, with_state=False))
    assert s is None and o.shape == (2, 5, 2, 6)
