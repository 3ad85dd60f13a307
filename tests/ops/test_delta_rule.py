"""`delta_rule` (recurrent and chunked WY form, dense and varlen) against the float64 loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linear_moe.ops import delta_rule
from ops_testing import (
    assert_close_with_grads, assert_varlen_equals_one_by_one, delta_inputs, generator, grads_of, randn, reference,
    rel_err, time_slice,
)

TOL = 1e-4


def _check_against_reference(args, forms, g):
    B, T, H, K = args["q"].shape
    V = args["v"].shape[-1]
    weights = [randn(g, B, T, H, V).double(), randn(g, B, H, K, V).double()]
    expected = grads_of(reference.delta_rule_ref, args, weights)
    for mode, chunk_size in forms:
        def run(**a):
            return delta_rule(**a, output_final_state=True, mode=mode, chunk_size=chunk_size)
        assert_close_with_grads(grads_of(run, args, weights), expected, TOL, f"mode={mode} chunk_size={chunk_size}")


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_delta_rule_matches_reference_with_gradients(gated):
    g = generator()
    forms = [("recurrent", 64), ("chunk", 16), ("chunk", 7), ("chunk", 64)]
    _check_against_reference(delta_inputs(gated, g, T=37), forms, g)


def test_delta_rule_chunk_is_stable_under_strong_gates():
    g = generator()
    args = delta_inputs(True, g, B=1, T=70, H=1)
    args["log_decay"] = F.logsigmoid(randn(g, 1, 70, 1)) * 30.0
    args["beta"] = torch.ones_like(args["beta"])  # full overwrite: the most ill-conditioned solve
    _check_against_reference(args, [("chunk", 64)], g)


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_delta_rule_varlen_equals_sequences_one_by_one(gated, mode):
    g = generator()
    cu = torch.tensor([0, 11, 11, 29, 44])
    N, T = len(cu) - 1, int(cu[-1])
    args = delta_inputs(gated, g, B=1, T=T, with_state=False)
    h0 = randn(g, N, 2, 8, 6)
    o, s = delta_rule(**args, initial_state=h0, output_final_state=True, cu_seqlens=cu, mode=mode, chunk_size=8)
    assert_varlen_equals_one_by_one(o, s, cu, h0, reference.delta_rule_ref, args, TOL)


def test_delta_rule_varlen_chunk_gradients_match_reference():
    g = generator()
    cu = torch.tensor([0, 19, 40])
    args = delta_inputs(True, g, B=1, T=40, with_state=False)
    args["initial_state"] = randn(g, 2, 2, 8, 6)
    weights = [randn(g, 1, 40, 2, 6).double(), randn(g, 2, 2, 8, 6).double()]

    def varlen(**a):
        return delta_rule(**a, output_final_state=True, cu_seqlens=cu, mode="chunk", chunk_size=8)

    def one_by_one(**a):
        h0 = a.pop("initial_state")
        parts = [reference.delta_rule_ref(**time_slice(a, lo, hi), initial_state=h0[i:i + 1])
                 for i, (lo, hi) in enumerate([(0, 19), (19, 40)])]
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 0)

    assert_close_with_grads(grads_of(varlen, args, weights), grads_of(one_by_one, args, weights), TOL,
                            names={"q", "k", "v", "beta", "log_decay", "initial_state"})


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_delta_rule_decode_step_equals_last_row(gated):
    g = generator()
    args = delta_inputs(gated, g, T=21)
    o_full, s_full = delta_rule(**args, output_final_state=True, mode="chunk", chunk_size=8)
    cut = {n: (x if n == "initial_state" else x[:, :-1]) for n, x in args.items()}
    _, s_prev = delta_rule(**cut, output_final_state=True, mode="chunk", chunk_size=8)
    last = {n: (s_prev if n == "initial_state" else x[:, -1:]) for n, x in args.items()}
    o_step, s_step = delta_rule(**last, output_final_state=True)
    assert rel_err(o_step, o_full[:, -1:]) < TOL and rel_err(s_step, s_full) < TOL


def test_delta_rule_low_precision_inputs_keep_dtype_and_fp32_state():
    g = generator()
    args = {n: x.bfloat16() for n, x in delta_inputs(True, g, T=20).items()}
    o, s = delta_rule(**args, output_final_state=True, mode="chunk", chunk_size=8)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    ro, rs = reference.delta_rule_ref(**args)
    assert rel_err(o, ro) < 2e-2 and rel_err(s, rs) < 1e-4


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_qk_l2norm_normalises_inside_the_op_with_gradients(gated, mode):
    """``qk_l2norm=True`` on raw q, k equals the float64 reference on ``q / sqrt(|q|² + 1e-6)`` (and k's), in output,
    state and the gradients of the raw q and k (through the norm)."""
    g = generator()
    args = delta_inputs(gated, g, T=23)
    args["q"], args["k"] = randn(g, 2, 23, 2, 8) * 3, randn(g, 2, 23, 2, 8) * 3  # raw, far from unit length
    weights = [randn(g, 2, 23, 2, 6).double(), randn(g, 2, 2, 8, 6).double()]

    def normalised_ref(q, k, **a):
        unit = lambda x: x / (x.square().sum(-1, keepdim=True) + 1e-6).sqrt()  # noqa: E731
        return reference.delta_rule_ref(unit(q), unit(k), **a)
    expected = grads_of(normalised_ref, {n: x.double() for n, x in args.items()}, weights)
    got = grads_of(lambda **a: delta_rule(**a, output_final_state=True, mode=mode, chunk_size=8, qk_l2norm=True),
                   args, weights)
    assert_close_with_grads(got, expected, TOL, mode)
