"""`short_conv` against the float64 loop: dense, varlen, decode step, gradients."""
from __future__ import annotations

import pytest
import torch

from linear_moe.ops import short_conv
from ops_testing import assert_close_with_grads, generator, grads_of, randn, reference, rel_err

TOL = 1e-5


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", ["silu", None])
def test_short_conv_matches_reference_with_gradients(width, activation):
    g = generator()
    B, T, C = 2, 13, 6
    args = dict(x=randn(g, B, T, C), weight=randn(g, C, width), bias=randn(g, C),
                initial_state=randn(g, B, C, width - 1))
    weights = [randn(g, B, T, C).double(), randn(g, B, C, width - 1).double()]

    def run(**a):
        return short_conv(**a, activation=activation, output_final_state=True)

    def ref(**a):
        return reference.short_conv_ref(**a, activation=activation)

    assert_close_with_grads(grads_of(run, args, weights), grads_of(ref, args, weights), TOL,
                            names={"x", "weight", "bias", "initial_state"})


def test_short_conv_short_input_keeps_older_state():
    """T < W-1: part of the new state still comes from the old one."""
    g = generator()
    x, w, h0 = randn(g, 1, 2, 3), randn(g, 3, 4), randn(g, 1, 3, 3)
    y, s = short_conv(x, w, initial_state=h0, output_final_state=True)
    ry, rs = reference.short_conv_ref(x, w, initial_state=h0)
    assert rel_err(y, ry) < TOL and torch.equal(s, torch.cat([h0[:, :, 2:], x.transpose(1, 2)], 2))


def test_short_conv_varlen_equals_sequences_one_by_one():
    g = generator()
    cu = torch.tensor([0, 1, 1, 7, 15])  # a one-token and an empty sequence
    N, C, W = 4, 5, 4
    x, w, b, h0 = randn(g, 1, 15, C), randn(g, C, W), randn(g, C), randn(g, N, C, W - 1)
    y, s = short_conv(x, w, b, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n in range(N):
        lo, hi = int(cu[n]), int(cu[n + 1])
        ry, rs = reference.short_conv_ref(x[:, lo:hi], w, b, initial_state=h0[n:n + 1])
        if hi > lo:
            assert rel_err(y[:, lo:hi], ry) < TOL, n
        assert rel_err(s[n:n + 1], rs) < TOL, n


def test_short_conv_decode_steps_equal_full_sequence():
    g = generator()
    x, w, b = randn(g, 2, 9, 4), randn(g, 4, 3), randn(g, 4)
    y_full, s_full = short_conv(x, w, b, output_final_state=True)
    state = None
    for t in range(9):
        y_t, state = short_conv(x[:, t:t + 1], w, b, initial_state=state, output_final_state=True)
        assert rel_err(y_t, y_full[:, t:t + 1]) < TOL, t
    assert torch.equal(state, s_full)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.zeros(2, 5)), "x must have shape"),
    (dict(weight=torch.zeros(3, 4)), "weight must have shape"),
    (dict(bias=torch.zeros(3)), "bias must have shape"),
    (dict(activation="relu"), "activation='relu'"),
    (dict(initial_state=torch.zeros(1, 4, 2)), "initial_state must have shape"),
    (dict(x=torch.zeros(2, 5, 4), cu_seqlens=torch.tensor([0, 5])), "batch size 1"),
])
def test_short_conv_rejects_bad_input(bad, match):
    args = dict(x=torch.zeros(1, 5, 4), weight=torch.zeros(4, 4))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        short_conv(**args)
