"""The output norm and gate of a linear mixer: ``y = norm(x) * act(gate)``, row by row over the last dim.

GLA, Gated DeltaNet, RetNet, MoM and others end this way before their output projection. In PyTorch it is a
dozen fp32 passes over ``[tokens, heads, head_dim]`` each way under autocast; the "fla" backend runs fla's fused
gated-norm kernel (one pass each way) where it covers the combination (RMSNorm or per-head LayerNorm, a swish
or sigmoid gate).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import compute_dtype, resolve, run_backend

NORMS = ("rmsnorm", "groupnorm", "none")
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "swish": F.silu, "silu": F.silu, "sigmoid": torch.sigmoid, "gelu": F.gelu,
    "relu": F.relu, "identity": lambda x: x, "none": lambda x: x,
}
FUSED_NORMS = ("rmsnorm", "groupnorm")
FUSED_ACTIVATIONS = ("swish", "silu", "sigmoid")


def norm_gate(x: Tensor, gate: Tensor | None = None, weight: Tensor | None = None, bias: Tensor | None = None, *,
              norm: str = "rmsnorm", activation: str = "swish", eps: float = 1e-5,
              backend: str | None = None) -> Tensor:
    """``norm(x) * activation(gate)`` over the last dim (``D``), computed in fp32, returned in x.dtype.

    Args:
        x: `[..., D]`; gate: x's shape, or None (no gate).
        weight: `[D]` (rmsnorm, groupnorm), bias: `[D]` (groupnorm) or None.
        norm: "rmsnorm" (``x / rms(x) * weight``), "groupnorm" (LayerNorm over D: RetNet's per-head GroupNorm)
            or "none".
        activation: one of ACTIVATIONS (swish | silu | sigmoid | gelu | relu | identity | none).
        backend: None/"auto" | "torch" | "fla". fla's fused kernel takes a gate, a norm and a swish/silu/sigmoid
            activation; other combinations always run in PyTorch.
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is unknown; allowed: {', '.join(repr(n) for n in NORMS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")
    D = x.shape[-1]
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")
    if norm != "none" and (weight is None or tuple(weight.shape) != (D,)):
        raise ValueError(f"norm={norm!r} needs weight of shape ({D},), got "
                         f"{None if weight is None else tuple(weight.shape)}")
    if gate is not None and norm in FUSED_NORMS and activation in FUSED_ACTIVATIONS:
        requires_grad = torch.is_grad_enabled() and any(
            isinstance(t, Tensor) and t.requires_grad for t in (x, gate, weight, bias))
        name = resolve("norm_gate", backend, x, requires_grad=requires_grad)
        if name != "torch":
            return run_backend(name, "norm_gate", x, gate, weight, bias, norm=norm, activation=activation, eps=eps)
    return norm_gate_torch(x, gate, weight, bias, norm=norm, activation=activation, eps=eps)


def norm_gate_torch(x, gate=None, weight=None, bias=None, *, norm="rmsnorm", activation="swish", eps=1e-5):
    """The PyTorch `norm_gate` (same arguments, already checked)."""
    dtype = compute_dtype(x.dtype)
    y = x.to(dtype)
    if norm == "rmsnorm":
        y = F.rms_norm(y, y.shape[-1:], weight.to(dtype), eps)
    elif norm == "groupnorm":
        y = F.layer_norm(y, y.shape[-1:], weight.to(dtype), None if bias is None else bias.to(dtype), eps)
    if gate is not None:
        y = y * ACTIVATIONS[activation](gate.to(dtype))
    return y.to(x.dtype)
