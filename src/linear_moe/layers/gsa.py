"""Gated Slot Attention (GSA; Zhang et al. 2024, "Gated Slot Attention for Efficient Linear-Time Sequence Modeling").

GSA keeps, per head, a bounded memory of ``M`` slots, written as two coupled GLA passes that share one
forget gate ``a_t = exp(log_f_t) ∈ (0, 1)^M`` and the write weights ``s_t = 1 - a_t``:

    K̃_t = K̃_{t-1} diag(a_t) + k_tᵀ s_t          [K, M]   keys of the slots
    Ṽ_t = diag(a_t) Ṽ_{t-1} + s_tᵀ v_t          [M, V]   values of the slots
    o_t = softmax(scale · q_t K̃_t) Ṽ_t                    read: softmax over the slots

The second pass is a plain GLA (key = ``s_t``, decay over its key dim). The first pass decays along
the slot (value) dim, which the ``gla`` op does not offer; we fold each slot into its own head with a
scalar decay (key dim K, value dim 1), which is exact and keeps to the primitives, at ``M`` times the
intra-chunk work of a value-dim-gated kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import gla, short_conv
from .config import AttentionConfig, MixerConfig
from .registry import register_mixer

_FEATURE_MAPS = {"swish": F.silu, "relu": F.relu, "identity": lambda x: x}
_MODES = {"auto": "auto", "chunk": "chunk", "recurrent": "recurrent", "fused_recurrent": "recurrent"}


def op_mode(mode: str, mixer: str) -> str:
    """Map a ``MixerConfig.mode`` to the op's ``mode`` argument, or raise naming the allowed values."""
    if mode not in _MODES:
        raise ValueError(f"{mixer}: mode={mode!r} is not supported; choose one of {sorted(_MODES)}")
    return _MODES[mode]


def num_heads_of(mixer: MixerConfig, attention: AttentionConfig, name: str) -> int:
    heads = mixer.num_heads or attention.num_heads
    if heads <= 0:
        raise ValueError(f"{name}: num_heads={heads} must be >= 1")
    return heads


def split_dim(total: int, heads: int, what: str, name: str) -> int:
    """``total // heads``, raising when ``heads`` does not divide ``total``."""
    if total <= 0 or total % heads:
        raise ValueError(f"{name}: {what}={total} must be a positive multiple of num_heads={heads}")
    return total // heads


class CausalConvs(nn.Module):
    """Depthwise causal convolutions of several projections, each with its own state entry.

    ``forward(name, x [B, T, C], state, new_state, cu_seqlens)`` reads ``state[f"conv_{name}"]``
    (``[B, C, W-1]``, or ``[N, C, W-1]`` with packed documents) and writes the continuation into ``new_state``.
    """

    def __init__(self, channels: dict[str, int], kernel_size: int, activation: str | None = "silu", mixer: str = ""):
        super().__init__()
        if not 2 <= kernel_size <= 4:
            raise ValueError(f"{mixer}: conv_size={kernel_size} must be in 2..4")
        self.activation = activation
        self.weight = nn.ParameterDict({
            n: nn.Parameter(torch.randn(c, kernel_size) / kernel_size ** 0.5) for n, c in channels.items()
        })

    def forward(self, name: str, x: torch.Tensor, state: dict | None, new_state: dict, cu_seqlens=None) -> torch.Tensor:
        key = f"conv_{name}"
        y, new_state[key] = short_conv(
            x, self.weight[name], None, activation=self.activation,
            initial_state=None if state is None else state[key], output_final_state=True, cu_seqlens=cu_seqlens,
        )
        return y


@register_mixer("gsa")
class GatedSlotAttention(nn.Module):
    """GSA token mixer.

    Reads ``MixerConfig``: num_heads, head_dim / expand_k (key dim per head), expand_v, num_slots,
    feature_map (swish (default) | relu | identity, on q and k), gate_logit_normalizer, use_short_conv,
    conv_size, mode. The output is ``o_proj(RMSNorm(swish(o)))`` as in the paper (no extra output gate).

    State: ``slot_keys [B, H*M, K, 1]`` (first pass, one head per slot), ``slot_values [B, H, M, V]``,
    and ``conv_q / conv_k / conv_v [B, C, W-1]`` when short convolutions are on.
    """

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        super().__init__()
        name = "gsa"
        self.num_heads = H = num_heads_of(mixer, attention, name)
        self.head_k_dim = mixer.head_dim or split_dim(int(hidden_size * mixer.expand_k), H, "key dim", name)
        self.head_v_dim = split_dim(int(hidden_size * mixer.expand_v), H, "value dim", name)
        if mixer.num_slots < 1:
            raise ValueError(f"{name}: num_slots={mixer.num_slots} must be >= 1")
        self.num_slots = mixer.num_slots
        fmap = mixer.feature_map or "swish"
        if fmap not in _FEATURE_MAPS:
            raise ValueError(f"{name}: feature_map={fmap!r} is not supported; choose one of {sorted(_FEATURE_MAPS)}")
        self.feature_map = _FEATURE_MAPS[fmap]
        if mixer.gate_logit_normalizer <= 0:
            raise ValueError(f"{name}: gate_logit_normalizer={mixer.gate_logit_normalizer} must be > 0")
        self.gate_logit_normalizer = mixer.gate_logit_normalizer
        self.mode = op_mode(mixer.mode, name)
        self.chunk_size = mixer.chunk_size
        self.backend = mixer.backend or None
        self.scale = 1.0  # the paper reads the slots with unscaled q·k (then softmax over slots)

        key_dim, value_dim = H * self.head_k_dim, H * self.head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.f_proj = nn.Linear(hidden_size, H * self.num_slots, bias=False)
        self.convs = (CausalConvs({"q": key_dim, "k": key_dim, "v": value_dim}, mixer.conv_size, "silu", name)
                      if mixer.use_short_conv else None)
        self.norm = nn.RMSNorm(value_dim, eps=1e-5)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, state: dict | None = None, cu_seqlens: torch.Tensor | None = None):
        """x ``[batch, time, hidden]`` → (y ``[batch, time, hidden]``, state dict)."""
        B, T, _ = x.shape
        H, K, V, M = self.num_heads, self.head_k_dim, self.head_v_dim, self.num_slots
        new_state: dict = {}
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.convs is not None:
            q = self.convs("q", q, state, new_state, cu_seqlens)
            k = self.convs("k", k, state, new_state, cu_seqlens)
            v = self.convs("v", v, state, new_state, cu_seqlens)
        q = self.feature_map(q.view(B, T, H, K))
        k = self.feature_map(k.view(B, T, H, K))
        v = F.silu(v.view(B, T, H, V))
        log_f = F.logsigmoid(self.f_proj(x).float().view(B, T, H, M)) / self.gate_logit_normalizer
        s = -torch.expm1(log_f)  # 1 - a_t, exact for a_t close to 1

        # Pass 1: one head per (head, slot) with scalar decay; its 1-dim "value" is the slot write weight.
        rep = lambda t: t.unsqueeze(3).expand(B, T, H, M, K).reshape(B, T, H * M, K)  # noqa: E731
        scores, new_state["slot_keys"] = gla(
            rep(q), rep(k), s.reshape(B, T, H * M, 1).to(q.dtype), log_f.reshape(B, T, H * M),
            scale=self.scale, initial_state=None if state is None else state["slot_keys"],
            output_final_state=True, cu_seqlens=cu_seqlens, mode=self.mode, chunk_size=self.chunk_size,
            backend=self.backend,
        )
        p = scores.view(B, T, H, M).float().softmax(-1)
        # Pass 2: plain GLA over the slots, read with the softmax weights.
        o, new_state["slot_values"] = gla(
            p.to(v.dtype), s.to(v.dtype), v, log_f, scale=1.0,
            initial_state=None if state is None else state["slot_values"],
            output_final_state=True, cu_seqlens=cu_seqlens, mode=self.mode, chunk_size=self.chunk_size,
            backend=self.backend,
        )
        y = self.o_proj(self.norm(F.silu(o.reshape(B, T, H * V))))
        return y, new_state
