"""Softmax attention (the `N` / `*` layers): rotary positions, grouped-query heads, SDPA kernels
(flash / cuDNN / memory-efficient on GPU), packed documents, a KV cache for generation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import causal_attention
from ..ops.rotary import apply_rotary, rotary_cos_sin
from .config import AttentionConfig, MixerConfig
from .registry import register_mixer


@register_mixer("attention")
class SoftmaxAttention(nn.Module):
    """State: ``{"k": [B, S, KV, D], "v": [B, S, KV, D], "offset": tokens seen}``; with a sliding window
    the cache keeps only the last ``window`` positions."""

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        super().__init__()
        self.num_heads = attention.num_heads
        self.num_kv_heads = attention.num_kv_heads or attention.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"attention num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        self.head_dim = attention.head_dim or hidden_size // self.num_heads
        self.rope_theta = attention.rope_theta
        self.window = attention.sliding_window
        bias = attention.qkv_bias
        self.q_proj = nn.Linear(hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, state: dict | None = None, cu_seqlens: torch.Tensor | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        offset = 0 if state is None else state["offset"]
        if cu_seqlens is not None:
            if state is not None:
                raise ValueError("attention: cu_seqlens (packed documents) cannot be combined with a decoding state")
            positions = _positions_in_documents(cu_seqlens, T, x.device)
        else:
            positions = torch.arange(offset, offset + T, device=x.device)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, dtype=q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if state is None:
            o = causal_attention(q, k, v, cu_seqlens=cu_seqlens, sliding_window=self.window)
            k_all, v_all = k, v
        else:
            k_all = torch.cat([state["k"], k], dim=1)
            v_all = torch.cat([state["v"], v], dim=1)
            o = _attend_with_cache(q, k_all, v_all, offset, self.window)
        if self.window:
            k_all, v_all = k_all[:, -self.window:], v_all[:, -self.window:]
        y = self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))
        return y, {"k": k_all, "v": v_all, "offset": offset + T}


def _positions_in_documents(cu_seqlens: torch.Tensor, T: int, device) -> torch.Tensor:
    """Position of each packed token inside its own document: ``[T]``."""
    idx = torch.arange(T, device=device)
    doc = torch.searchsorted(cu_seqlens[1:].to(device), idx, right=True)
    return idx - cu_seqlens.to(device)[doc]


def _attend_with_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, window: int) -> torch.Tensor:
    """New queries ``[B, T, H, D]`` at positions offset..offset+T-1 against cached + new keys ``[B, S, KV, D]``."""
    T, S = q.shape[1], k.shape[1]
    q_pos = torch.arange(offset, offset + T, device=q.device)[:, None]
    k_pos = torch.arange(offset + T - S, offset + T, device=q.device)[None, :]
    mask = k_pos <= q_pos
    if window:
        mask &= k_pos > q_pos - window
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)
