"""Gated Linear Attention (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient Training").

Per head, a data-dependent forget gate over the key dim:

    α_t = sigmoid(x_t W_α1 W_α2 + b_α) ^ (1/τ)   ∈ (0, 1)^K
          (low rank: W_α1 [C, r], W_α2 [r, H·K]; τ = gate_logit_normalizer)
    S_t = diag(α_t) S_{t-1} + k_tᵀ v_t           [K, V]
    o_t = K^-0.5 · q_t S_t
    y_t = o_proj(swish(x_t W_r) ⊙ norm(o_t))     per-head norm, then the output gate

``log α_t = logsigmoid(·) / τ`` is what the ``gla`` op takes (``log_decay [B, T, H, K]``); the
normaliser τ (16 in the paper) keeps the gates near 1 so the memory is long.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .common import (
    OutputNormGate, fused_projections, grouped_qkv, init_weights, op_options, op_run_options, qkv_projections,
    repeat_heads, resolve_dims,
    state_get, upcast,
)
from .config import AttentionConfig, MixerConfig
from .feature_maps import feature_map
from .registry import register_mixer


@register_mixer("gla")
class GatedLinearAttention(nn.Module):
    """GLA token mixer.

    Reads ``MixerConfig``: num_heads, num_kv_heads (keys, values and gates shared by query groups),
    head_dim / expand_k, expand_v, feature_map (default identity; elementwise maps only), gate_low_rank_dim,
    gate_logit_normalizer, output_norm, gate_fn, use_output_gate, mode, chunk_size, backend. The paper's
    layer has no short convolution (``use_short_conv`` is not read).

    State: ``{"recurrent": [batch, heads, K, V]}`` (fp32).
    """

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        super().__init__()
        name = "gla"
        H, KVH, K, V = resolve_dims(hidden_size, mixer, attention, name, grouped_kv=True)
        self.num_heads, self.num_kv_heads, self.head_k_dim, self.head_v_dim = H, KVH, K, V
        if mixer.gate_logit_normalizer <= 0:
            raise ValueError(f"gla: gate_logit_normalizer={mixer.gate_logit_normalizer} must be > 0")
        if mixer.gate_low_rank_dim < 1:
            raise ValueError(f"gla: gate_low_rank_dim={mixer.gate_low_rank_dim} must be >= 1")
        self.gate_logit_normalizer = mixer.gate_logit_normalizer
        self.feature_map = feature_map(mixer.feature_map or "identity", K, name)
        if self.feature_map.out_dim != K:
            raise ValueError(f"gla: feature_map={mixer.feature_map!r} changes the key width; the gate is per key "
                             "channel, so use an elementwise one (identity, elu, relu, swish)")
        self.mode, self.backend, self.chunk_size = op_options(mixer, name)

        self.q_proj, self.k_proj, self.v_proj = qkv_projections(hidden_size, H * K, KVH * K, KVH * V)
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, mixer.gate_low_rank_dim, bias=False),
                                     nn.Linear(mixer.gate_low_rank_dim, KVH * K, bias=True))
        self.g_proj = nn.Linear(hidden_size, H * V, bias=False) if mixer.use_output_gate else None
        self.out_norm = OutputNormGate(V, norm=mixer.output_norm, gate_fn=mixer.gate_fn, mixer=name, backend=self.backend)
        self.o_proj = nn.Linear(H * V, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)

    def forward(self, x: torch.Tensor, state: dict | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """x ``[batch, time, hidden]`` → (y ``[batch, time, hidden]``, state)."""
        B, T, _ = x.shape
        H, KVH, K, V = self.num_heads, self.num_kv_heads, self.head_k_dim, self.head_v_dim
        # one matmul for the input projections and the gate's first (low-rank) half; parameters stay separate
        xq, xk, xv, gk_low, gate = fused_projections(x, self.q_proj, self.k_proj, self.v_proj, self.gk_proj[0],
                                                     self.g_proj)
        q, k, v = grouped_qkv(self, x, self.feature_map, projected=(xq, xk, xv))
        log_decay = F.logsigmoid(upcast(self.gk_proj[1](gk_low)).view(B, T, KVH, K)) / self.gate_logit_normalizer
        o, recurrent = ops.gla(
            q, k, v, repeat_heads(log_decay, H // KVH), scale=K ** -0.5, initial_state=state_get(state, "recurrent"),
            output_final_state=True, cu_seqlens=cu_seqlens, **op_run_options(self, T),
        )
        y = self.o_proj(self.out_norm(o, gate).reshape(B, T, H * V))
        return y, {"recurrent": recurrent}
