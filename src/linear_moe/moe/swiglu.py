"""The experts' SwiGLU ``silu(gate) * up``, optionally times a per-row routing weight, as one autograd
function that saves only its inputs and recomputes ``silu`` in backward.

Why: written as plain ops, autograd keeps four ``[rows, H]`` tensors per layer (gate, up, silu(gate) and
the product) and runs four elementwise passes each way; here it keeps two and runs one pass each way
(Triton on CUDA, see ``kernels.py``). Folding the routing weight in here (``down(h * w) = w * down(h)``)
lets the combine be a plain sum that saves nothing.

The grouped experts compute gate and up as one ``[rows, 2H]`` tensor (gate columns first): the forward
reads its two halves as strided views, and ``swiglu_backward_gate_up`` writes both gradients into one
tensor of that layout, ready for the single GEMM back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from linear_moe.ops.backends import optional_module


def fused_kernels():
    """The Triton kernel module (``kernels.py``), or None when Triton does not import."""
    return optional_module("linear_moe.moe.kernels")


def use_fused_kernels(t: torch.Tensor) -> bool:
    """Triton kernels run for CUDA tensors in eager mode (torch.compile fuses the torch form itself)."""
    return t.is_cuda and not torch.compiler.is_compiling() and fused_kernels() is not None


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # 16-bit inputs compute in fp32, float64 stays


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-autograd ``silu(gate) * up * weight[:, None]`` in fp32 (or float64), cast to gate's dtype."""
    acc = _acc(gate)
    h = F.silu(gate.to(acc)) * up.to(acc)
    if weight is not None:
        h = h * weight.to(acc).unsqueeze(-1)
    return h.to(gate.dtype)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """No-autograd ``silu(gate) * up (* weight[:, None])`` -> [M, H] (Triton on CUDA, torch otherwise)."""
    if use_fused_kernels(gate):
        return fused_kernels().swiglu_forward(gate, up, weight)
    with torch.no_grad():
        return swiglu_reference(gate, up, weight)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None, grad: torch.Tensor,
                    want_output: bool = False):
    """No-autograd gradients of ``swiglu_forward`` given ``grad [M, H]`` -> (grad_gate, grad_up, grad_weight
    [M] in fp32/float64 or None, and the forward output recomputed in the same pass if ``want_output``)."""
    if use_fused_kernels(gate):
        return fused_kernels().swiglu_backward(gate, up, weight, grad, want_output)
    return _backward_torch(gate, up, weight, grad, want_output)


def swiglu_backward_gate_up(gate_up: torch.Tensor, weight: torch.Tensor | None, grad: torch.Tensor,
                            want_output: bool = False):
    """``swiglu_backward`` for gate and up side by side in one ``gate_up [M, 2H]`` (gate columns first, as one
    GEMM against the stacked ``[gate; up]`` weight writes them) -> (grad_gate_up [M, 2H] in that layout, so one
    GEMM takes it back; grad_weight [M] or None; the output [M, H] if ``want_output``)."""
    if use_fused_kernels(gate_up):
        return fused_kernels().swiglu_backward_gate_up(gate_up, weight, grad, want_output)
    h = gate_up.shape[1] // 2
    dg, du, dw, out = _backward_torch(gate_up[:, :h], gate_up[:, h:], weight, grad, want_output)
    return torch.cat([dg, du], dim=1), dw, out


def _backward_torch(gate, up, weight, grad, want_output=False):
    acc = _acc(gate)
    g, u, dh = gate.to(acc), up.to(acc), grad.to(acc)
    s = torch.sigmoid(g)
    a = g * s
    out = a * u if want_output else None
    dw = None
    if weight is not None:
        dw = (dh * a * u).sum(-1)
        dh = dh * weight.to(acc).unsqueeze(-1)
        if out is not None:
            out = out * weight.to(acc).unsqueeze(-1)
    du = dh * a
    dg = dh * u * (s * (1 + g * (1 - s)))
    return dg.to(gate.dtype), du.to(up.dtype), dw, None if out is None else out.to(gate.dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight):
        ctx.save_for_backward(gate, up, weight)
        return swiglu_forward(gate, up, weight)

    @staticmethod
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        dg, du, dw, _ = swiglu_backward(gate, up, weight, grad)
        if dw is not None:
            dw = dw.to(weight.dtype)
        return dg, du, dw


def swiglu(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up (* weight[:, None])`` -> [M, H] in gate's dtype; math in fp32.

    gate, up [M, H] (same dtype), weight [M] (any float dtype; its gradient comes back in that dtype) or None.
    Saves gate, up and weight for backward, nothing else.
    """
    if gate.shape != up.shape or gate.dim() != 2:
        raise ValueError(f"swiglu needs gate and up of one shape [rows, width], got {tuple(gate.shape)} and {tuple(up.shape)}")
    if weight is not None and weight.shape != gate.shape[:1]:
        raise ValueError(f"swiglu weight must be [rows]={tuple(gate.shape[:1])}, got {tuple(weight.shape)}")
    return _SwiGLU.apply(gate, up, weight)
