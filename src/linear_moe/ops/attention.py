"""Causal softmax attention over `[batch, time, heads, dim]`, on PyTorch's fused SDPA kernels.

Keys/values may have fewer heads than queries (grouped-query attention). Packed sequences (`cu_seqlens`) and
sliding windows run on PyTorch's variable-length flash attention (`torch.nn.attention.varlen`) where it can run
the call (CUDA, 16-bit, head dim <= 256); elsewhere they become a boolean `[T, T]` mask for SDPA, which on a GPU
costs T² memory and the masked kernels.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import cached_cast, check_cu_seqlens, check_rank, max_seqlen
from .backends import torch_forced
from .context import sequence_parallel_handler

# SDPA is a builtin without an introspectable signature; `enable_gqa` arrived in torch 2.5.
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def attention_mask(time: int, cu_seqlens: Tensor | None = None, sliding_window: int = 0,
                   device: torch.device | str = "cpu") -> Tensor:
    """Boolean `[T, T]` mask, True where query i may attend key j: j <= i, same sequence, and
    i - j < sliding_window when the window is > 0."""
    i = torch.arange(time, device=device)
    allowed = i.unsqueeze(1) >= i.unsqueeze(0)
    if sliding_window > 0:
        allowed &= (i.unsqueeze(1) - i.unsqueeze(0)) < sliding_window
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(device)
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        allowed &= seq.unsqueeze(1) == seq.unsqueeze(0)
    return allowed


def causal_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None,
                     sliding_window: int = 0, scale: float | None = None) -> Tensor:
    """Causal softmax attention.

    Args:
        q: `[B, T, H, D]`; k: `[B, T, Hkv, D]`; v: `[B, T, Hkv, Dv]` with H a multiple of Hkv (GQA).
        cu_seqlens: int `[N+1]` packed-sequence boundaries (B == 1): no attention across them.
        sliding_window: > 0 lets each query see only its `sliding_window` most recent keys
            (itself included); 0 means unlimited.
        scale: default `D ** -0.5`.
    Returns:
        `[B, T, H, Dv]` in q.dtype.
    """
    if (sp := sequence_parallel_handler()) is not None:  # time split over devices (parallel/lasp2.py)
        return sp.causal_attention(q, k, v, cu_seqlens=cu_seqlens, sliding_window=sliding_window, scale=scale)
    check_rank("q", q, 4, "[B, T, H, D]")
    check_rank("k", k, 4, "[B, T, Hkv, D]")
    check_rank("v", v, 4, "[B, T, Hkv, Dv]")
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if k.shape != (B, T, Hkv, D) or v.shape[:3] != (B, T, Hkv):
        raise ValueError(f"k must be [B, T, Hkv, D] and v [B, T, Hkv, Dv] matching q {tuple(q.shape)}, "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hkv={Hkv}")
    if not isinstance(sliding_window, int) or sliding_window < 0:
        raise ValueError(f"sliding_window={sliding_window!r} must be an int >= 0 (0 = no window)")
    check_cu_seqlens(cu_seqlens, B, T)
    if (cu_seqlens is not None or sliding_window > 0) and _varlen_runs(q, v, sliding_window, scale):
        return _varlen_attention(q, k, v, cu_seqlens, sliding_window, scale)
    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))  # SDPA wants [B, H, T, D]
    gqa = {}
    if H != Hkv:
        if _SDPA_HAS_GQA:
            gqa = {"enable_gqa": True}
        else:
            k_, v_ = (x.repeat_interleave(H // Hkv, dim=1) for x in (k_, v_))
    if cu_seqlens is None and sliding_window == 0:
        out = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale, **gqa)
    else:
        mask = attention_mask(T, cu_seqlens, sliding_window, q.device)
        out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=scale, **gqa)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _varlen_api():
    """(varlen_attn, its keyword names) from ``torch.nn.attention.varlen``, or None where this torch lacks it. Its
    signature moved between releases (``is_causal`` in 2.10; ``window_size`` and ``enable_gqa`` later)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_runs(q: Tensor, v: Tensor, sliding_window: int, scale: float | None) -> bool:
    """Whether PyTorch's varlen flash attention takes this call: CUDA, fp16/bf16, equal q/v head dims that are a
    multiple of 8 up to 256, and a window or a scale only where the API has ``window_size`` / ``scale``; not when
    ``LINEAR_MOE_KERNEL_BACKEND=torch``."""
    api = _varlen_api()
    D = q.shape[-1]
    if torch_forced():  # LINEAR_MOE_KERNEL_BACKEND=torch: the plain SDPA path everywhere
        return False
    return (api is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and v.shape[-1] == D
            and D % 8 == 0 and D <= 256 and (sliding_window == 0 or "window_size" in api[1])
            and (scale is None or "scale" in api[1]))


def _varlen_attention(q, k, v, cu_seqlens, sliding_window, scale):
    """Packed (or windowed) causal attention on ``varlen_attn``: the batch rows are sequences of their own when
    there is no cu_seqlens. Returns ``[B, T, H, D]``."""
    fn, params = _varlen_api()
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if cu_seqlens is None:
        cu, longest = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device), T
    else:
        cu, longest = cached_cast(cu_seqlens, torch.int32), max_seqlen(cu_seqlens, T)  # read once per tensor
    q_, k_, v_ = (x.reshape(B * T, x.shape[2], x.shape[3]) for x in (q, k, v))
    kwargs = {} if scale is None else {"scale": scale}
    if Hkv != H:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k_, v_ = (x.repeat_interleave(H // Hkv, dim=1) for x in (k_, v_))
    if "window_size" in params:  # (left, right): each query sees itself and sliding_window - 1 keys before it
        kwargs["window_size"] = (sliding_window - 1 if sliding_window > 0 else -1, 0)
    else:
        kwargs["is_causal"] = True
    return fn(q_, k_, v_, cu, cu, longest, longest, **kwargs).view(B, T, H, D)
