"""Helpers shared by the ops tests: fresh random inputs, the float64 references, error measures, and
the output-and-gradient comparison of an op against its reference.

`reference.py` is loaded by path under a unique module name, so a `reference.py` in another test
folder can never shadow it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

_spec = importlib.util.spec_from_file_location("linear_moe_ops_reference", Path(__file__).with_name("reference.py"))
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

# Every kind of decay `gla` accepts, plus the two extras (bonus, normalize) the tests cover.
GLA_KINDS = ("none", "constant", "scalar", "vector", "vector_bonus", "normalize")


def generator() -> torch.Generator:
    """A fresh seed per test (printed by pytest on failure through the assertion message)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))


def randn(g, *shape):
    return torch.randn(*shape, generator=g)


def gla_inputs(kind: str, g: torch.Generator, B=2, T=37, H=2, K=8, V=6, with_state=True, decay_scale=1.0):
    """Keyword arguments for `gla` / `gla_ref` of the given kind (all leaf tensors)."""
    args = dict(q=randn(g, B, T, H, K), k=randn(g, B, T, H, K), v=randn(g, B, T, H, V))
    if kind == "constant":
        args["log_decay"] = -torch.rand(H, generator=g) * decay_scale
    elif kind == "scalar":
        args["log_decay"] = F.logsigmoid(randn(g, B, T, H) + 1.0) * decay_scale
    elif kind in ("vector", "vector_bonus"):
        args["log_decay"] = F.logsigmoid(randn(g, B, T, H, K) + 1.0) * decay_scale
    if kind == "vector_bonus":
        args["bonus"] = randn(g, H, K)
    extra = 0
    if kind == "normalize":
        # Positive features (as a feature map gives) keep the denominator away from zero.
        args["q"], args["k"] = args["q"].abs() + 0.1, args["k"].abs() + 0.1
        args["normalize"] = True
        extra = 1
    if with_state:
        state = randn(g, B, H, K, V + extra)
        args["initial_state"] = state.abs() + 0.1 if kind == "normalize" else state
    return args


def delta_inputs(gated: bool, g: torch.Generator, B=2, T=37, H=2, K=8, V=6, with_state=True):
    args = dict(q=randn(g, B, T, H, K), k=F.normalize(randn(g, B, T, H, K), dim=-1), v=randn(g, B, T, H, V),
                beta=torch.rand(B, T, H, generator=g))
    if gated:
        args["log_decay"] = F.logsigmoid(randn(g, B, T, H) + 1.0)
    if with_state:
        args["initial_state"] = randn(g, B, H, K, V)
    return args


def leaves(args: dict) -> dict:
    """Fresh leaf copies that require grad (float tensors only)."""
    return {n: (x.detach().clone().requires_grad_(True) if isinstance(x, torch.Tensor) else x)
            for n, x in args.items()}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def grads_of(fn, args: dict, weights: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """Run fn(**args) -> tensors, backprop sum(out * w) and return (outputs, grads by name)."""
    args = leaves(args)
    outs = fn(**args)
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    loss.backward()
    return [o.detach() for o in outs], {n: x.grad for n, x in args.items()
                                       if isinstance(x, torch.Tensor) and x.grad is not None}


def assert_close_with_grads(actual: tuple, expected: tuple, tol: float, where: str = "",
                            names: set[str] | None = None) -> None:
    """Compare two ``grads_of`` results (outputs, grads by name): every output and every input gradient
    within relative error ``tol``, the same inputs receiving gradients (``names``, when given)."""
    (outs, grads), (ref_outs, ref_grads) = actual, expected
    for i, (o, r) in enumerate(zip(outs, ref_outs, strict=True)):
        err = rel_err(o, r)
        assert err < tol, f"output {i} {where}: {err}"
    assert set(grads) == set(ref_grads), f"{where}: gradients of {sorted(grads)}, reference {sorted(ref_grads)}"
    if names is not None:
        assert set(grads) == names, f"{where}: gradients of {sorted(grads)}, expected {sorted(names)}"
    for name in ref_grads:
        err = rel_err(grads[name], ref_grads[name])
        assert err < tol, f"d{name} {where}: {err}"


def time_slice(args: dict, lo: int, hi: int) -> dict:
    """``args`` with every per-token tensor (``[batch, time, ...]``, 3 or more dims) cut to tokens lo:hi;
    per-head tensors (a constant decay ``[H]``, a bonus ``[H, K]``) and other values kept."""
    return {n: (x[:, lo:hi] if isinstance(x, torch.Tensor) and x.dim() >= 3 else x) for n, x in args.items()}


def assert_varlen_equals_one_by_one(out: torch.Tensor, final_state: torch.Tensor, cu_seqlens: torch.Tensor,
                                    initial_state: torch.Tensor, ref, args: dict, tol: float) -> None:
    """An op's packed result over ``cu_seqlens`` (out ``[1, T, ...]``, final state ``[N, ...]``) equals
    ``ref(**args)`` on each sequence alone, started from its own ``initial_state[n]`` (empty ones included)."""
    for n in range(cu_seqlens.numel() - 1):
        lo, hi = int(cu_seqlens[n]), int(cu_seqlens[n + 1])
        ref_out, ref_state = ref(**time_slice(args, lo, hi), initial_state=initial_state[n:n + 1])
        if hi > lo:
            assert rel_err(out[:, lo:hi], ref_out) < tol, f"sequence {n}"
        assert rel_err(final_state[n:n + 1], ref_state) < tol, f"final state of sequence {n}"
