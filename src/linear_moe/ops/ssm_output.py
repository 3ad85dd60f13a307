"""The output stage of an SSD layer (Mamba2), after the scan: the ``D`` skip, the ``z`` gate and the grouped
RMSNorm, ``rmsnorm_G((y + D x) * silu(z)) * weight``.

In PyTorch that is about ten fp32 passes over ``[tokens, heads * head_dim]`` forward and twenty backward (the
upcasts, the skip, the gate, the norm's square, mean and scale): ~5 of a Mamba2 layer's 14.5 ms of kernels at
32K tokens on the H100 (hidden 1024, 2048 channels). On CUDA it is one Triton kernel each way
(``backends/triton/ssm_output.py``): the forward reads y, x and z once and writes the output and one fp32 scale
per row and group; the backward reads them again with the output gradient and writes dy, dx, dz and per-block
partial sums of the weight's and D's gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import compute_dtype
from .backends import optional_module, torch_forced

MAX_GROUP = 8192  # channels per group the kernel holds in one block; wider groups run in PyTorch


def ssm_output_torch(y: Tensor, x: Tensor, D: Tensor, z: Tensor | None, weight: Tensor | None, groups: int,
                     eps: float, out_dtype: torch.dtype | None = None) -> Tensor:
    """The PyTorch form (same arguments as `ssm_output`), fp32 compute (float64 stays float64)."""
    B, T, H, P = y.shape
    acc = compute_dtype(y.dtype)
    out = y.to(acc) + D.to(acc)[:, None] * x.to(acc)
    out = out.reshape(B, T, H * P)
    if z is not None:
        out = out * F.silu(z.to(acc))
    if weight is not None:
        grouped = out.view(B, T, groups, -1)
        out = (grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + eps)).view(B, T, H * P)
        out = out * weight.to(acc)
    return out if out_dtype is None else out.to(out_dtype)


def _kernel(y: Tensor):
    """Our Triton module for CUDA tensors in eager mode, unless the torch backend is forced; else None."""
    if not y.is_cuda or torch.compiler.is_compiling() or torch_forced():
        return None
    return optional_module("linear_moe.ops.backends.triton.ssm_output")


def ssm_output(y: Tensor, x: Tensor, D: Tensor, z: Tensor | None = None, weight: Tensor | None = None, *,
               groups: int = 1, eps: float = 1e-5, out_dtype: torch.dtype | None = None) -> Tensor:
    """``rmsnorm_G((y + D x) * silu(z)) * weight`` → ``[B, T, H * P]``, computed in fp32 (float64 for float64
    inputs) and returned in ``out_dtype`` (default: the compute dtype).

    Args:
        y, x: ``[B, T, H, P]`` (the scan's output and its input); D: ``[H]``.
        z: ``[B, T, H * P]`` or None (no gate). weight: ``[H * P]`` or None (no norm).
        groups: the norm's groups over the ``H * P`` channels (Mamba2's ``ngroups``); eps: the norm's epsilon.

    On CUDA with both gate and norm: one Triton kernel each way (``LINEAR_MOE_KERNEL_BACKEND=torch`` keeps
    PyTorch); elsewhere PyTorch.
    """
    B, T, H, P = y.shape
    if x.shape != y.shape or tuple(D.shape) != (H,):
        raise ValueError(f"ssm_output: y {tuple(y.shape)}, x {tuple(x.shape)}, D {tuple(D.shape)}; want y and x "
                         f"[B, T, H, P] and D [H]")
    if z is not None and tuple(z.shape) != (B, T, H * P):
        raise ValueError(f"ssm_output: z {tuple(z.shape)}, want [B, T, H*P] = {(B, T, H * P)}")
    if weight is not None and (tuple(weight.shape) != (H * P,) or groups < 1 or (H * P) % groups):
        raise ValueError(f"ssm_output: weight {tuple(weight.shape)}, groups={groups}; want weight [H*P] = "
                         f"[{H * P}] and groups dividing {H * P}")
    kernel = _kernel(y) if z is not None and weight is not None and (H * P) // groups <= MAX_GROUP else None
    if kernel is not None:
        return kernel.ssm_output(y, x, D, z, weight, groups, eps, out_dtype or torch.float32)
    return ssm_output_torch(y, x, D, z, weight, groups, eps, out_dtype)
