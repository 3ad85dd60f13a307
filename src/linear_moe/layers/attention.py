"""Softmax attention (the `N` / `*` layers): rotary positions, grouped-query heads, SDPA kernels
(flash / cuDNN / memory-efficient on GPU), packed documents, a preallocated KV cache for generation.

The decoding state is a KV cache of fixed capacity written in place (see ``SoftmaxAttention``), so a
one-token step has static shapes, reads no device value on the host and can be captured in a CUDA graph.
Rows of one batch may hold prompts of different lengths: each row's cache is left-padded and a per-row
``start`` slot masks the padding, so ragged batches decode as one batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import causal_attention
from ..ops.rotary import apply_rotary, rotary_cos_sin
from .config import AttentionConfig, MixerConfig
from .registry import register_mixer

CACHE_ROUND = 64  # capacities are multiples of this (aligned masks for the fused SDPA kernels; fewer regrowths)
CACHE_KEYS = ("k", "v", "offset", "slot", "start", "used")


@register_mixer("attention")
class SoftmaxAttention(nn.Module):
    """State (a dict; every row shares the slot it writes next, left padding keeps rows aligned)::

        "k": [B, KV, C, D], "v": [B, KV, C, Dv]   cache buffers of capacity C (keys already rotated; heads
                                                  before slots, as the attention kernels read them)
        "offset": [B] long   tokens seen by each row (the position of its next token)
        "slot":   [] long    the next slot written (device copy, advanced inside a captured graph)
        "start":  [B] long   each row's first valid slot (> 0 for left-padded rows)
        "used":   int        host copy of ``slot``: decides growth without reading the device

    A continuing call writes its keys/values into the given buffers in place and the returned state shares
    them. An older state of the same buffers can still continue (the slots past its own are masked until
    it overwrites them), but two continuations of one state must not interleave: clone it to branch. When ``used + T`` exceeds C the cache is copied into one of
    double capacity (with a sliding window, slots no future query can see are dropped first). Inside a
    captured CUDA graph ``used`` does not advance: reserve the capacity first (``reserve_kv_cache``).
    """

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
        self.decode_kernel = "auto"  # how a continuing call reads the cache (see cached_attention)

    def forward(self, x: torch.Tensor, state: dict | None = None, cu_seqlens: torch.Tensor | None = None):
        """x ``[batch, time, hidden]`` → (y ``[batch, time, hidden]``, KV-cache state)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        steps = torch.arange(T, device=x.device)
        if cu_seqlens is not None:
            if state is not None:
                raise ValueError("attention: cu_seqlens (packed documents) cannot be combined with a decoding state")
            positions = _positions_in_documents(cu_seqlens, T, x.device)
        elif state is None:
            positions = steps
        else:
            positions = state["offset"][:, None] + steps  # [B, T]: rows of a ragged batch sit at their own positions
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, dtype=q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if state is None:
            o = causal_attention(q, k, v, cu_seqlens=cu_seqlens, sliding_window=self.window)
            new_state = _new_cache(k, v, self.window)
        else:
            new_state = _write(state, k, v, self.window)
            o = cached_attention(q, new_state["k"], new_state["v"], new_state["slot"] - T, new_state["start"], self.window,
                                 self.decode_kernel)
        y = self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))
        return y, new_state


def _positions_in_documents(cu_seqlens: torch.Tensor, T: int, device) -> torch.Tensor:
    """Position of each packed token inside its own document: ``[T]``."""
    idx = torch.arange(T, device=device)
    doc = torch.searchsorted(cu_seqlens[1:].to(device), idx, right=True)
    return idx - cu_seqlens.to(device)[doc]


def cache_capacity(tokens: int) -> int:
    """The capacity holding ``tokens``: rounded up to a multiple of ``CACHE_ROUND``."""
    return max(CACHE_ROUND, -(-tokens // CACHE_ROUND) * CACHE_ROUND)


def is_kv_cache(state) -> bool:
    """Whether ``state`` is a softmax-attention decoding state (a dict with exactly ``CACHE_KEYS``)."""
    return isinstance(state, dict) and set(state) == set(CACHE_KEYS)


def _buffer(like: torch.Tensor, batch: int, capacity: int) -> torch.Tensor:
    """An empty cache buffer ``[batch, KV, capacity, D]`` shaped and typed like the cache ``like``."""
    return like.new_zeros(batch, like.shape[1], capacity, like.shape[3])


def _new_cache(k: torch.Tensor, v: torch.Tensor, window: int) -> dict:
    """The cache after a prefill of keys/values ``[B, T, KV, D]`` (a window keeps the last ``window``)."""
    B, T = k.shape[:2]
    keep = min(T, window) if window else T
    k, v = k[:, T - keep:].transpose(1, 2), v[:, T - keep:].transpose(1, 2)
    cache_k, cache_v = _buffer(k, B, cache_capacity(keep)), _buffer(v, B, cache_capacity(keep))
    cache_k[:, :, :keep], cache_v[:, :, :keep] = k, v
    dev = k.device
    return {"k": cache_k, "v": cache_v, "offset": torch.full((B,), T, dtype=torch.long, device=dev),
            "slot": torch.full((), keep, dtype=torch.long, device=dev),  # filled on the device: no host copy
            "start": torch.zeros(B, dtype=torch.long, device=dev), "used": keep}


def _write(state: dict, k: torch.Tensor, v: torch.Tensor, window: int) -> dict:
    """Write ``[B, T, KV, D]`` keys/values at slots ``slot .. slot+T-1`` (in place, growing first if full)."""
    T = k.shape[1]
    if state["used"] + T > state["k"].shape[2]:
        state = _grow(state, state["used"] + T, window)
    idx = state["slot"] + torch.arange(T, device=k.device)  # device-side: the same kernels every step
    state["k"].index_copy_(2, idx, k.transpose(1, 2).to(state["k"].dtype))
    state["v"].index_copy_(2, idx, v.transpose(1, 2).to(state["v"].dtype))
    return {"k": state["k"], "v": state["v"], "offset": state["offset"] + T, "slot": state["slot"] + T,
            "start": state["start"], "used": state["used"] + T}


def _grow(state: dict, needed: int, window: int) -> dict:
    """A copy of the cache with room for ``needed`` slots: double the capacity until it fits; with a window,
    first drop the slots older than ``window - 1`` before the next query (no future query reads them)."""
    used = state["used"]
    drop = max(0, used - (window - 1)) if window else 0
    capacity = state["k"].shape[2]
    while capacity < needed - drop:
        capacity *= 2
    B = state["k"].shape[0]
    k, v = _buffer(state["k"], B, capacity), _buffer(state["v"], B, capacity)
    k[:, :, :used - drop], v[:, :, :used - drop] = state["k"][:, :, drop:used], state["v"][:, :, drop:used]
    return {"k": k, "v": v, "offset": state["offset"], "slot": state["slot"] - drop,
            "start": (state["start"] - drop).clamp(min=0), "used": used - drop}


def reserve_kv_cache(state: dict, capacity: int) -> dict:
    """``state`` with room for at least ``capacity`` slots (rounded up; a copy when it must grow)."""
    if state["k"].shape[2] >= capacity:
        return state
    B, used = state["k"].shape[0], state["used"]
    k, v = _buffer(state["k"], B, cache_capacity(capacity)), _buffer(state["v"], B, cache_capacity(capacity))
    k[:, :, :used], v[:, :, :used] = state["k"][:, :, :used], state["v"][:, :, :used]
    return {**state, "k": k, "v": v}


def stack_kv_caches(rows: list[dict], reserve: int = 0) -> dict:
    """One batch cache from the caches of separate calls (any batch sizes and lengths): each row is
    left-padded so every row's next slot is the same; ``start`` marks where its own keys begin. ``reserve``:
    room for that many more slots, made now rather than by a later copy (``reserve_kv_cache``)."""
    used = max(r["used"] for r in rows)
    B = sum(r["k"].shape[0] for r in rows)
    capacity = cache_capacity(used + reserve)
    k, v = _buffer(rows[0]["k"], B, capacity), _buffer(rows[0]["v"], B, capacity)
    starts, b = [], 0
    for r in rows:
        n, pad = r["k"].shape[0], used - r["used"]
        k[b:b + n, :, pad:used], v[b:b + n, :, pad:used] = r["k"][:, :, :r["used"]], r["v"][:, :, :r["used"]]
        starts.append(r["start"] + pad)
        b += n
    return {"k": k, "v": v, "offset": torch.cat([r["offset"] for r in rows]),
            "slot": torch.full((), used, dtype=torch.long, device=k.device), "start": torch.cat(starts), "used": used}


def cache_mask(slot: torch.Tensor, start: torch.Tensor, time: int, capacity: int, window: int = 0) -> torch.Tensor:
    """Boolean ``[B, 1, T, C]``, True where query i (at slot ``slot + i``) of row b may read cache slot j:
    ``start[b] <= j <= slot + i`` and, with a window, ``slot + i - j < window``."""
    j = torch.arange(capacity, device=start.device)
    q_slot = (slot + torch.arange(time, device=start.device))[:, None]      # [T, 1]
    allowed = (j <= q_slot)[None] & (j >= start[:, None, None])             # [B, T, C]
    if window:
        allowed = allowed & (j > q_slot - window)[None]
    return allowed[:, None]


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor, start: torch.Tensor,
                     window: int = 0, kernel: str = "auto") -> torch.Tensor:
    """Queries ``[B, T, H, D]`` written at slots ``slot ..`` against a cache ``[B, KV, C, D]`` /
    ``[B, KV, C, Dv]`` through ``cache_mask``. Returns ``[B, T, H, Dv]``.

    Each kv head's query group is laid out along the query axis (``[B, KV, T * G, D]``), so grouped-query
    heads read the cache as it is (no repeated copy of the cache per step). ``kernel``: ``"sdpa"`` (PyTorch's
    fused attention with a mask), ``"matmul"`` (two batched matrix products around an fp32 softmax: with one
    query row per head it is a matrix-vector product spread over the whole cache, where the fused kernels
    give each head one thread block), or ``"auto"``: matmul when T == 1, else sdpa."""
    if kernel not in ("auto", "sdpa", "matmul"):
        raise ValueError(f"cached_attention kernel={kernel!r}; allowed: 'auto', 'sdpa', 'matmul'")
    B, T, H, D = q.shape
    KV, C, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // KV
    q_ = q.view(B, T, KV, G, D).permute(0, 2, 1, 3, 4).reshape(B, KV, T * G, D)
    mask = cache_mask(slot, start, T, C, window)
    if G > 1:
        mask = mask.repeat_interleave(G, dim=2, output_size=T * G)
    if kernel == "matmul" or (kernel == "auto" and T == 1):
        scores = torch.matmul(q_, k.transpose(-1, -2)).float() * D ** -0.5          # [B, KV, T*G, C]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
        o = torch.matmul(probs, v)
    else:
        o = F.scaled_dot_product_attention(q_, k, v, attn_mask=mask)
    return o.view(B, KV, T, G, Dv).permute(0, 2, 1, 3, 4).reshape(B, T, H, Dv)
