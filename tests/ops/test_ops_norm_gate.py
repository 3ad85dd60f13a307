"""`ops.norm_gate` (a mixer's output norm times its activated gate) against a float64 reference, with gradients;
bad arguments; which backend runs which combination."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linear_moe import ops
from linear_moe.ops import backends
from linear_moe.ops.norm_gate import ACTIVATIONS
from ops_testing import assert_close_with_grads, generator, grads_of, randn

REF_ACT = {"swish": lambda g: g * torch.sigmoid(g), "silu": lambda g: g * torch.sigmoid(g), "sigmoid": torch.sigmoid,
           "gelu": lambda g: 0.5 * g * (1 + torch.erf(g / 2 ** 0.5)), "relu": lambda g: g.clamp_min(0),
           "identity": lambda g: g, "none": lambda g: g}


def reference(x, gate=None, weight=None, bias=None, *, norm, activation, eps=1e-5):
    x = x.double()
    if norm == "rmsnorm":
        x = x / (x.square().mean(-1, keepdim=True) + eps).sqrt() * weight.double()
    elif norm == "groupnorm":
        mu = x.mean(-1, keepdim=True)
        x = (x - mu) / ((x - mu).square().mean(-1, keepdim=True) + eps).sqrt() * weight.double() + bias.double()
    return x if gate is None else x * REF_ACT[activation](gate.double())


@pytest.mark.parametrize("norm", ["rmsnorm", "groupnorm", "none"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_matches_reference_with_gradients(norm, activation):
    g = generator()
    args = dict(x=randn(g, 2, 5, 3, 16) * 2, gate=randn(g, 2, 5, 3, 16))
    if norm != "none":
        args["weight"] = randn(g, 16)
    if norm == "groupnorm":
        args["bias"] = randn(g, 16)
    weights = [randn(g, 2, 5, 3, 16).double()]
    got = grads_of(lambda **a: (ops.norm_gate(**a, norm=norm, activation=activation),), args, weights)
    want = grads_of(lambda **a: (reference(**a, norm=norm, activation=activation),),
                    {n: t.double() for n, t in args.items()}, weights)
    assert_close_with_grads(got, want, 1e-5, f"{norm}/{activation}")


def test_without_gate_and_in_bf16():
    g = generator()
    x, w = randn(g, 4, 2, 8).bfloat16(), randn(g, 8)
    y = ops.norm_gate(x, None, w, norm="rmsnorm")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference(x, None, w, norm="rmsnorm", activation="none"), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(norm="layernorm"), "norm='layernorm' is unknown; allowed: 'rmsnorm', 'groupnorm', 'none'"),
    (dict(activation="tanh"), "activation='tanh' is unknown; allowed: swish, silu, sigmoid"),
    (dict(gate=torch.zeros(3, 8)), r"gate must have x's shape \(3, 4\), got \(3, 8\)"),
    (dict(weight=torch.ones(5)), r"norm='rmsnorm' needs weight of shape \(4,\), got \(5,\)"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    args = dict(x=torch.zeros(3, 4), gate=torch.zeros(3, 4), weight=torch.ones(4)) | kwargs
    with pytest.raises(ValueError, match=message):
        ops.norm_gate(**args)


def test_backend_choice():
    """CPU runs PyTorch; a forced fla refuses with the reason where fla's kernel covers the combination, and never
    applies where it does not (gelu, no gate, no norm): those always run in PyTorch."""
    x, gate, w = torch.randn(3, 4), torch.randn(3, 4), torch.ones(4)
    with pytest.raises(RuntimeError, match="kernel backend 'fla' cannot run norm_gate: fla needs a CUDA device"):
        ops.norm_gate(x, gate, w, backend="fla")
    want = ops.norm_gate(x, gate, w, activation="gelu", backend="torch")
    assert torch.equal(ops.norm_gate(x, gate, w, activation="gelu", backend="fla"), want)
    assert torch.equal(ops.norm_gate(x, None, w, backend="fla"), ops.norm_gate(x, None, w))
    assert backends.resolve_backend("norm_gate", None, "cpu", torch.float32) == "torch"
