"""Short causal depthwise convolution (the local mixing before q/k/v in Mamba, DeltaNet, GLA, ...).

    y_t[c] = act(bias[c] + sum_w weight[c, w] * x_{t - (W-1) + w}[c])

weight[:, -1] multiplies the current step. The state is the last W-1 inputs, oldest first, so a
one-step call (T = 1) with the previous state is the decode step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_cu_seqlens, check_rank, check_shape, resolve, run_backend
from .context import sequence_parallel_handler

ACTIVATIONS = (None, "silu")


def short_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, activation: str | None = "silu",
               initial_state: Tensor | None = None, output_final_state: bool = False,
               cu_seqlens: Tensor | None = None, backend: str | None = None) -> tuple[Tensor, Tensor | None]:
    """Causal depthwise convolution over time.

    Args:
        x: `[B, T, C]`; weight: `[C, W]` with W in 2..4 (any W >= 1 works here); bias: `[C]` or None.
        activation: "silu" or None.
        initial_state: the W-1 inputs before x, `[B, C, W-1]` (`[N, C, W-1]` with cu_seqlens); zeros
            when None.
        output_final_state: return the last W-1 inputs of each sequence (else None).
        cu_seqlens: int `[N+1]` boundaries of packed sequences (B == 1); each starts from its own state.
        backend: None/"auto" | "torch" | "fla" | "triton" (see `linear_moe.ops.backends`).
    Returns:
        y `[B, T, C]` in x.dtype, final state `[B or N, C, W-1]` in x.dtype (or None).
    """
    if (sp := sequence_parallel_handler()) is not None:  # time split over devices (parallel/lasp2.py)
        return sp.short_conv(x, weight, bias, activation=activation, initial_state=initial_state,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=backend)
    check_rank("x", x, 3, "[B, T, C]")
    B, T, C = x.shape
    check_rank("weight", weight, 2, "[C, W]")
    if weight.shape[0] != C:
        raise ValueError(f"weight must have shape [C, W] with C={C} channels of x, got {tuple(weight.shape)}")
    W = weight.shape[1]
    check_shape("bias", bias, (C,), "[C]")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is unknown; allowed: None, 'silu'")
    n = check_cu_seqlens(cu_seqlens, B, T)
    check_shape("initial_state", initial_state, (B if n is None else n, C, W - 1),
                "[B (or N with cu_seqlens), C, W-1]")
    requires_grad = torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (x, weight, bias, initial_state))
    name = resolve("short_conv", backend, x, requires_grad=requires_grad, cu_seqlens=cu_seqlens is not None)
    if name != "torch":
        return run_backend(name, "short_conv", x, weight, bias, activation=activation,
                           initial_state=initial_state, output_final_state=output_final_state,
                           cu_seqlens=cu_seqlens)
    return short_conv_torch(x, weight, bias, activation=activation, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def short_conv_torch(x, weight, bias=None, *, activation="silu", initial_state=None,
                     output_final_state=False, cu_seqlens=None):
    """The pure-PyTorch `short_conv` (same arguments, inputs already checked)."""
    B, T, C = x.shape
    W = weight.shape[1]
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is None:
        initial_state = x.new_zeros(n_seq, C, W - 1)
    initial_state = initial_state.to(x.dtype)
    if T == 0:  # conv1d refuses an input shorter than its kernel
        return x.new_zeros(B, 0, C), (initial_state if output_final_state else None)
    if cu_seqlens is None:
        ext = torch.cat([initial_state, x.transpose(1, 2)], dim=2)  # [B, C, W-1+T]
        y = F.conv1d(ext, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype), groups=C)
        final = ext[:, :, ext.shape[2] - (W - 1):]
        y = y.transpose(1, 2)
    else:
        y, final = _varlen_conv(x, weight, bias, initial_state, cu_seqlens)
    if activation == "silu":
        y = F.silu(y)
    return y, (final if output_final_state else None)


def _varlen_conv(x, weight, bias, initial_state, cu_seqlens):
    # Lay the packed sequences out as [state_0, x_0, state_1, x_1, ...] along time and run one
    # convolution: each output window then sees only its own sequence and that sequence's state.
    C, W = weight.shape
    cu = cu_seqlens.long()
    n = cu.numel() - 1
    lengths = cu[1:] - cu[:-1]
    seq_id = torch.repeat_interleave(torch.arange(n, device=x.device), lengths)
    token_pos = torch.arange(x.shape[1], device=x.device) + (seq_id + 1) * (W - 1)
    slot = torch.arange(W - 1, device=x.device)
    state_pos = (cu[:-1] + torch.arange(n, device=x.device) * (W - 1)).unsqueeze(1) + slot  # [N, W-1]
    total = x.shape[1] + n * (W - 1)
    ext = x.new_zeros(total, C)
    ext = ext.index_copy(0, token_pos, x[0]).index_copy(0, state_pos.reshape(-1),
                                                      initial_state.transpose(1, 2).reshape(-1, C))
    y = F.conv1d(ext.t().unsqueeze(0), weight.unsqueeze(1).to(x.dtype),
                 None if bias is None else bias.to(x.dtype), groups=C)  # [1, C, total-(W-1)]
    y = y[0].t()[token_pos - (W - 1)].unsqueeze(0)
    end_pos = (cu[1:] + (torch.arange(n, device=x.device) + 1) * (W - 1)).unsqueeze(1) - (W - 1) + slot
    final = ext[end_pos.reshape(-1)].reshape(n, W - 1, C).transpose(1, 2)
    return y, final
