"""The public contract of `gla` / `delta_rule`: clear errors for bad input, the `mode="auto"` rule,
and backend selection on CPU."""
from __future__ import annotations

import pytest
import torch

import linear_moe.ops as ops
from linear_moe.ops import delta_rule, gla
from linear_moe.ops._checks import AUTO_RECURRENT_MAX_LEN, pick_mode
from ops_testing import delta_inputs, generator, gla_inputs, rel_err

B, T, H, K, V = 1, 6, 2, 4, 3


def _gla_args():
    return dict(q=torch.zeros(B, T, H, K), k=torch.zeros(B, T, H, K), v=torch.zeros(B, T, H, V))


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.zeros(B, T, H)), r"q must have shape \[B, T, H, K\]"),
    (dict(k=torch.zeros(B, T, H, K + 1)), "k must have shape"),
    (dict(v=torch.zeros(B, T + 1, H, V)), "v must have shape"),
    (dict(log_decay=torch.zeros(B, T)), r"log_decay has shape \(1, 6\) \(rank 2\)"),
    (dict(log_decay=torch.zeros(H + 1)), "log_decay has shape"),
    (dict(log_decay=torch.zeros(B, T, H, K, 1)), "rank 5"),
    (dict(bonus=torch.zeros(K, H)), "bonus must have shape"),
    (dict(initial_state=torch.zeros(B, H, K, V + 1)), "initial_state must have shape"),
    (dict(normalize=True, initial_state=torch.zeros(B, H, K, V)), r"initial_state must have shape \[N, H, K, V\+1\]"),
    (dict(mode="fused"), "mode='fused' is unknown"),
    (dict(chunk_size=0), "chunk_size=0"),
    (dict(cu_seqlens=torch.tensor([0, 2, 6]), q=torch.zeros(2, T, H, K), k=torch.zeros(2, T, H, K),
          v=torch.zeros(2, T, H, V)), "batch size 1, got batch=2"),
    (dict(cu_seqlens=torch.tensor([0, 4, 2, 6])), "never decrease"),
    (dict(cu_seqlens=torch.tensor([0, 5])), "end at time=6"),
    (dict(cu_seqlens=torch.tensor([0.0, 6.0])), "int32 or int64"),
    (dict(cu_seqlens=torch.tensor([0, 3, 6]), initial_state=torch.zeros(1, H, K, V)), r"\(2, 2, 4, 3\)"),
])
def test_gla_rejects_bad_input(bad, match):
    args = _gla_args()
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        gla(**args)


@pytest.mark.parametrize("bad, match", [
    (dict(beta=torch.zeros(B, T, H, 1)), "beta must have shape"),
    (dict(log_decay=torch.zeros(B, T, H, K)), r"log_decay for delta_rule must be None or \[B, T, H\]"),
    (dict(log_decay=torch.zeros(H)), "log_decay for delta_rule"),
    (dict(mode="parallel"), "mode='parallel'"),
    (dict(q=torch.zeros(B, T, H, K, 1)), "q must have shape"),
    (dict(cu_seqlens=torch.tensor([[0, 6]])), "1-D integer tensor"),
])
def test_delta_rule_rejects_bad_input(bad, match):
    args = _gla_args()
    args["beta"] = torch.zeros(B, T, H)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        delta_rule(**args)


def test_auto_mode_is_recurrent_for_short_sequences_only():
    assert pick_mode("auto", None, 1) == "recurrent"
    assert pick_mode("auto", None, AUTO_RECURRENT_MAX_LEN) == "recurrent"
    assert pick_mode("auto", None, AUTO_RECURRENT_MAX_LEN + 1) == "chunk"
    # Packed decoding: many sequences of one token each is still a recurrent step.
    many = torch.arange(0, 101)
    assert pick_mode("auto", many, 100) == "recurrent"
    assert pick_mode("auto", torch.tensor([0, 3, 40]), 40) == "chunk"
    assert pick_mode("chunk", None, 1) == "chunk"


def test_auto_mode_agrees_with_both_forms():
    g = generator()
    for T_ in (5, 30):
        args = gla_inputs("vector", g, T=T_)
        o_auto, _ = gla(**args)
        o_rec, _ = gla(**args, mode="recurrent")
        o_chunk, _ = gla(**args, mode="chunk", chunk_size=8)
        assert rel_err(o_auto, o_rec) < 1e-5 and rel_err(o_auto, o_chunk) < 1e-5


def test_forced_backends_that_cannot_run_raise(monkeypatch):
    args = _gla_args()
    for name in ("fla", "triton"):
        with pytest.raises(RuntimeError, match=name):
            gla(**args, backend=name)
        with pytest.raises(RuntimeError, match=name):
            delta_rule(**args, beta=torch.zeros(B, T, H), backend=name)
        with pytest.raises(RuntimeError, match=name):
            ops.short_conv(torch.zeros(1, 4, 3), torch.zeros(3, 2), backend=name)
    with pytest.raises(ValueError, match="not a kernel backend"):
        gla(**args, backend="cuda")
    monkeypatch.setenv("LINEAR_MOE_KERNEL_BACKEND", "fla")
    with pytest.raises(RuntimeError, match="fla"):
        gla(**args)  # the env var overrides "auto"
    monkeypatch.setenv("LINEAR_MOE_KERNEL_BACKEND", "torch")
    o, _ = gla(**args)
    assert o.shape == (B, T, H, V)


def test_backend_is_called_with_the_public_arguments(monkeypatch):
    """A non-torch backend gets the call unchanged (the GPU engineer's wrappers rely on it)."""
    import linear_moe.ops.backends as bk

    seen = {}

    class Fake:
        @staticmethod
        def delta_rule(*args, **kwargs):
            seen["args"], seen["kwargs"] = args, kwargs
            return "fake", None

    monkeypatch.setattr(bk, "resolve_backend", lambda *a, **kw: "fla")
    monkeypatch.setattr(bk, "get_backend", lambda name: Fake)
    g = generator()
    args = delta_inputs(True, g, T=4)
    assert delta_rule(**args, chunk_size=32)[0] == "fake"
    assert seen["args"][0] is args["q"] and seen["args"][4] is args["log_decay"]
    assert seen["kwargs"]["chunk_size"] == 32 and seen["kwargs"]["initial_state"] is args["initial_state"]


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_empty_time_axis_passes_the_state_through(mode):
    g = generator()
    args = gla_inputs("vector", g, T=0)
    o, s = gla(**args, output_final_state=True, mode=mode)
    assert o.shape == (2, 0, 2, 6) and torch.equal(s, args["initial_state"])
    args = delta_inputs(True, g, T=0)
    o, s = delta_rule(**args, output_final_state=True, mode=mode)
    assert o.shape == (2, 0, 2, 6) and torch.equal(s, args["initial_state"])
    h0 = torch.randn(2, 3, 3, generator=g)
    y, s = ops.short_conv(torch.zeros(2, 0, 3), torch.zeros(3, 4), initial_state=h0, output_final_state=True)
    assert y.shape == (2, 0, 3) and torch.equal(s, h0)
