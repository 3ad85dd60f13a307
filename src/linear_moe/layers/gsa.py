"""Gated Slot Attention (GSA; Zhang et al. 2024, "Gated Slot Attention for Efficient Linear-Time Sequence Modeling").

GSA keeps, per head, a bounded memory of ``M`` slots, written as two coupled GLA passes that share one
forget gate ``a_t = exp(log_f_t) ∈ (0, 1)^M`` and the write weights ``s_t = 1 - a_t``:

    K̃_t = K̃_{t-1} diag(a_t) + k_tᵀ s_t          [K, M]   keys of the slots
    Ṽ_t = diag(a_t) Ṽ_{t-1} + s_tᵀ v_t          [M, V]   values of the slots
    o_t = softmax(scale · q_t K̃_t) Ṽ_t                    read: softmax over the slots

The second pass is a plain GLA (key = ``s_t``, decay over its key dim); the first decays along the slot
(value) dim. Both run in :func:`linear_moe.ops.gsa`: fla's ``chunk_gsa`` on CUDA, two ``gla`` passes
elsewhere (the first with one head per slot: exact, ``M`` times that pass's work).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops  # attribute access at call time (see common.py)
from .common import (
    RMSNorm, ShortConvQKV, init_weights, op_options, op_run_options, qkv_projections, resolve_dims, short_conv_enabled,
    state_get,
)
from .config import AttentionConfig, MixerConfig
from .feature_maps import feature_map
from .registry import register_mixer

FEATURE_MAPS = ("swish", "relu", "identity")


@register_mixer("gsa")
class GatedSlotAttention(nn.Module):
    """GSA token mixer.

    Reads ``MixerConfig``: num_heads, head_dim / expand_k (key dim per head), expand_v, num_slots,
    feature_map (swish (default) | relu | identity, on q and k), gate_logit_normalizer, use_short_conv
    (default off, as the paper), conv_size, mode, chunk_size, backend. The output is
    ``o_proj(RMSNorm(swish(o)))`` as in the paper (no extra output gate).

    State: ``slot_keys [B, H, K, M]``, ``slot_values [B, H, M, V]`` (fp32),
    and ``conv_q / conv_k / conv_v [B, C, W-1]`` when short convolutions are on.
    """

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        super().__init__()
        name = "gsa"
        H, _, K, V = resolve_dims(hidden_size, mixer, attention, name)
        if mixer.num_slots < 1:
            raise ValueError(f"gsa: num_slots={mixer.num_slots} must be >= 1")
        if mixer.gate_logit_normalizer <= 0:
            raise ValueError(f"gsa: gate_logit_normalizer={mixer.gate_logit_normalizer} must be > 0")
        if mixer.feature_map not in ("",) + FEATURE_MAPS:
            raise ValueError(f"gsa: feature_map={mixer.feature_map!r} is not supported; choose one of: {', '.join(FEATURE_MAPS)}")
        self.num_heads, self.num_slots, self.head_k_dim, self.head_v_dim = H, mixer.num_slots, K, V
        self.feature_map = feature_map(mixer.feature_map or "swish", K, name)
        self.gate_logit_normalizer = mixer.gate_logit_normalizer
        self.mode, self.backend, self.chunk_size = op_options(mixer, name)
        self.scale = 1.0  # the paper reads the slots with unscaled q·k (then softmax over slots)

        self.q_proj, self.k_proj, self.v_proj = qkv_projections(hidden_size, H * K, H * K, H * V)
        self.f_proj = nn.Linear(hidden_size, H * self.num_slots, bias=False)
        # The paper has no short convolution; with use_short_conv=True: q_conv / k_conv / v_conv (SiLU).
        self.use_short_conv = short_conv_enabled(mixer, False, name)
        self.short_convs = ShortConvQKV(self, {"q": H * K, "k": H * K, "v": H * V}, enabled=self.use_short_conv,
                                        conv_size=mixer.conv_size, activation="silu", mixer=name)
        self.norm = RMSNorm(H * V, eps=1e-5)
        self.o_proj = nn.Linear(H * V, hidden_size, bias=False)
        init_weights(self)

    def forward(self, x: torch.Tensor, state: dict | None = None, cu_seqlens: torch.Tensor | None = None):
        """x ``[batch, time, hidden]`` → (y ``[batch, time, hidden]``, state dict)."""
        B, T, _ = x.shape
        H, K, V, M = self.num_heads, self.head_k_dim, self.head_v_dim, self.num_slots
        new_state: dict = {}
        q, k, v = self.short_convs(self, (self.q_proj(x), self.k_proj(x), self.v_proj(x)), state, new_state, cu_seqlens)
        q = self.feature_map(q.view(B, T, H, K))
        k = self.feature_map(k.view(B, T, H, K))
        v = F.silu(v.view(B, T, H, V))
        log_f = F.logsigmoid(self.f_proj(x).float().view(B, T, H, M)) / self.gate_logit_normalizer
        s = -torch.expm1(log_f)  # 1 - a_t, without cancellation when a_t is close to 1
        hk0, hv0 = state_get(state, "slot_keys"), state_get(state, "slot_values")
        o, (new_state["slot_keys"], new_state["slot_values"]) = ops.gsa(
            q, k, v, s, log_f, scale=self.scale, initial_state=None if hk0 is None else (hk0, hv0),
            output_final_state=True, cu_seqlens=cu_seqlens, **op_run_options(self, T),
        )
        y = self.o_proj(self.norm(F.silu(o.reshape(B, T, H * V))))
        return y, new_state
