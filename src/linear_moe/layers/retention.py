"""Linear attention with a constant per-head decay: RetNet's retention and Lightning Attention.

Both are ``S_t = γ_h S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t`` with a fixed decay ``γ_h`` per head
(the ``gla`` op with ``log_decay [H]``); they differ in how ``γ`` is chosen and what surrounds it.

* Retention (Sun et al. 2023, RetNet): ``γ_h = 1 - 2^(-5-h)`` (multi-scale), rotary positions on q and k
  (xPos without its length extrapolation term), ``scale = K^-0.5``, per-head GroupNorm (``output_norm``)
  and a swish output gate: ``y = o_proj(swish(x W_g) ⊙ GN(o))``.
* Lightning Attention (Qin et al. 2024, TransNormerLLM / Lightning Attention-2): ``γ_h = exp(-s_h · r_l)``
  with ALiBi slopes ``s_h`` and a depth ratio ``r_l = 1 - l/(L-1) + 1e-5`` (lower layers forget faster);
  ``q, k = silu(·)`` (``feature_map``), no scale, ``y = o_proj(norm(o) ⊙ gate_fn(x W_u))``.
  TransNormerLLM's gate is linear (``gate_fn="identity"``), MiniMax-01's is ``sigmoid``; ``swish`` by default here.
  The norm is per head (one weight shared by heads), where TransNormerLLM normalises across all heads at
  once; per head keeps heads independent, so tensor parallelism needs no reduction inside the mixer.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from .common import (
    OutputNormGate, init_weights, op_options, op_run_options, qkv_projections, resolve_dims, state_get, upcast,
)
from .config import AttentionConfig, MixerConfig
from .feature_maps import feature_map
from .registry import register_mixer


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's geometric head slopes ``2^(-8i/n)``; for n not a power of two, interleaved from the next one."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def token_positions(B: int, T: int, offset: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute position of each token and the offset to continue from.

    Returns (positions ``[B, T]`` long, new offset ``[B]``, or ``[N]`` per packed document). Positions
    restart at each ``cu_seqlens`` boundary (from ``offset[n]`` of that document).
    """
    steps = torch.arange(T, device=device)
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens packs documents along time and needs batch size 1, got batch={B}")
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if offset is None:
        offset = torch.zeros(n, dtype=torch.long, device=device)
    elif offset.shape != (n,):
        raise ValueError(f"state['offset'] must have shape [{n}] (batch, or documents with cu_seqlens), "
                         f"got {tuple(offset.shape)}")
    if cu_seqlens is None:
        return offset[:, None] + steps, offset + T
    lengths = cu_seqlens.diff()
    doc = torch.repeat_interleave(torch.arange(n, device=device), lengths, output_size=T)
    positions = steps - cu_seqlens[:-1][doc] + offset[doc]
    return positions[None], offset + lengths


class _ConstantDecayAttention(nn.Module):
    """Shared body: q/k/v/gate projections, the decayed linear recurrence, output norm and gate."""

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig):
        super().__init__()
        name = self.mixer_name
        H, _, K, V = resolve_dims(hidden_size, mixer, attention, name)
        self.num_heads, self.head_k_dim, self.head_v_dim = H, K, V
        self.mode, self.backend, self.chunk_size = op_options(mixer, name)
        self.q_proj, self.k_proj, self.v_proj = qkv_projections(hidden_size, H * K, H * K, H * V)
        self.g_proj = nn.Linear(hidden_size, H * V, bias=False) if mixer.use_output_gate else None
        self.out_norm = OutputNormGate(V, norm=mixer.output_norm, gate_fn=mixer.gate_fn, mixer=name, backend=self.backend)
        self.o_proj = nn.Linear(H * V, hidden_size, bias=False)

    def reset_parameters(self) -> None:
        init_weights(self)

    def _log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """``log γ`` ``[heads]`` on x's device, at least fp32 (cached; not a buffer, which ``.to(bf16)`` would round).

        ``log_gammas`` is a plain list over this module's heads: tensor parallelism keeps a rank's slice of it.
        """
        key = (x.device, upcast(x).dtype, tuple(self.log_gammas))
        cache = self.__dict__.setdefault("_decay_cache", {})
        if key not in cache:
            cache[key] = torch.tensor(self.log_gammas, device=key[0], dtype=key[1])
        return cache[key]

    def _mix(self, x, q, k, v, log_decay, scale, state, cu_seqlens, new_state):
        B, T, _ = x.shape
        o, new_state["recurrent"] = ops.gla(
            q, k, v, log_decay, scale=scale, initial_state=state_get(state, "recurrent"),
            output_final_state=True, cu_seqlens=cu_seqlens, **op_run_options(self, T),
        )
        gate = self.g_proj(x) if self.g_proj is not None else None
        return self.o_proj(self.out_norm(o, gate).reshape(B, T, -1)), new_state


@register_mixer("retention")
class MultiScaleRetention(_ConstantDecayAttention):
    """RetNet's multi-scale retention.

    Reads ``MixerConfig``: num_heads, head_dim / expand_k (must give an even key dim per head, for the
    rotation), expand_v, output_norm (``groupnorm`` is the paper's; rmsnorm default, as RetNet's later
    code), gate_fn (swish), use_output_gate, mode, chunk_size, backend; ``AttentionConfig.rope_theta``.

    State: ``{"recurrent": [batch, heads, K, V], "offset": [batch] (long, tokens seen)}``.
    """

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        super().__init__(hidden_size, mixer, attention)
        if self.head_k_dim % 2:
            raise ValueError(f"retention: key head dim={self.head_k_dim} must be even (rotary positions)")
        self.rope_theta = attention.rope_theta
        # A plain tensor rebuilt per call, not a buffer: a model built on the meta device stays exact.
        self.log_gammas = [math.log(1.0 - 2.0 ** (-5.0 - h)) for h in range(self.num_heads)]
        self.reset_parameters()

    def forward(self, x: torch.Tensor, state: dict | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """x ``[batch, time, hidden]`` → (y ``[batch, time, hidden]``, state)."""
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        positions, offset = token_positions(B, T, state_get(state, "offset"), cu_seqlens, x.device)
        cos, sin = ops.rotary_cos_sin(positions, K, self.rope_theta, dtype=upcast(x).dtype)
        q = ops.apply_rotary(self.q_proj(x).view(B, T, H, K), cos, sin)
        k = ops.apply_rotary(self.k_proj(x).view(B, T, H, K), cos, sin)
        v = self.v_proj(x).view(B, T, H, V)
        return self._mix(x, q, k, v, self._log_decay(x), K ** -0.5, state, cu_seqlens, {"offset": offset})


@register_mixer("lightning_attention")
class LightningAttention(_ConstantDecayAttention):
    """Lightning Attention (TransNormerLLM's NormLinearAttention with depth-dependent decay).

    Reads ``MixerConfig``: num_heads, head_dim / expand_k, expand_v, feature_map (default swish, on q and
    k), output_norm, gate_fn, use_output_gate, mode, chunk_size, backend; the decay uses ``layer_idx`` and
    ``num_layers``. State: ``{"recurrent": [batch, heads, K, V]}``.
    """

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        super().__init__(hidden_size, mixer, attention)
        if not 0 <= layer_idx < max(num_layers, 1):
            raise ValueError(f"lightning_attention: layer_idx={layer_idx} must be in [0, num_layers={num_layers})")
        self.feature_map = feature_map(mixer.feature_map or "swish", self.head_k_dim, "lightning_attention")
        if self.feature_map.out_dim != self.head_k_dim:
            raise ValueError(f"lightning_attention: feature_map={mixer.feature_map!r} changes the key width; "
                             "use an elementwise one (identity, elu, relu, swish)")
        depth = 1.0 - layer_idx / max(num_layers - 1, 1) + 1e-5
        # a plain list turned into a tensor per call, not a buffer: meta-device init stays exact
        self.log_gammas = [-slope * depth for slope in alibi_slopes(self.num_heads)]
        self.reset_parameters()

    def forward(self, x: torch.Tensor, state: dict | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """x ``[batch, time, hidden]`` → (y ``[batch, time, hidden]``, state)."""
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        q = self.feature_map(self.q_proj(x).view(B, T, H, K))
        k = self.feature_map(self.k_proj(x).view(B, T, H, K))
        v = self.v_proj(x).view(B, T, H, V)
        return self._mix(x, q, k, v, self._log_decay(x), 1.0, state, cu_seqlens, {})
