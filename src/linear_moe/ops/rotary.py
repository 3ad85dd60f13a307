"""Rotary position embedding (RoPE), Llama's half-split convention.

The head dim is split into halves (x1, x2) and each pair (x1[i], x2[i]) is rotated by the angle
position * theta^(-2i/dim), i.e. `[x1 cos - x2 sin, x2 cos + x1 sin]`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .context import sequence_parallel_handler


def rotary_cos_sin(positions: Tensor, dim: int, theta: float = 10000.0,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Rotation tables for `positions` (integer `[..., T]`, e.g. `[T]` or `[B, T]`).

    Args:
        dim: the rotated width (even; the head dim, or less for partial rotary).
        theta: the base of the frequencies.
    Returns:
        cos, sin: `[..., T, dim // 2]` in `dtype`.
    """
    if (sp := sequence_parallel_handler()) is not None:  # local positions -> positions in the full sequence
        positions = sp.global_positions(positions)
    if not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"rotary dim={dim!r} must be a positive even int")
    if not isinstance(positions, Tensor) or positions.dtype.is_floating_point or positions.dim() < 1:
        raise ValueError("positions must be an integer tensor [..., T], got "
                         f"{positions.dtype if isinstance(positions, Tensor) else type(positions).__name__}")
    # Angles in fp64: at positions ~1e5 an fp32 product is already off by ~1e-2 radians. The
    # table is small ([T, dim/2]), so the cost is nil (MPS has no fp64, so it keeps fp32).
    work = torch.float32 if positions.device.type == "mps" else torch.float64
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=work, device=positions.device) / dim)
    angles = positions.to(work).unsqueeze(-1) * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` `[B, T, H, D]` by tables `[T, R/2]` or `[B, T, R/2]` from `rotary_cos_sin`.

    The first R <= D dims are rotated (R = D for full rotary); the rest pass through. Returns x's
    shape and dtype (the rotation itself runs in fp32).
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, T, H, D], got {tuple(x.shape)}")
    half = cos.shape[-1]
    if 2 * half > x.shape[-1] or cos.shape != sin.shape or cos.shape[-2] != x.shape[1]:
        raise ValueError(f"cos/sin must have shape [(B,) T={x.shape[1]}, R/2] with R <= D={x.shape[-1]}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()  # broadcast over heads
    rot, rest = x[..., :2 * half].float(), x[..., 2 * half:]
    x1, x2 = rot[..., :half], rot[..., half:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out
