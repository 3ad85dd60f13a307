"""Based (Arora et al. 2024) and ReBased (Aksenov et al. 2024): normalised linear attention over a
small feature dim with a polynomial kernel.

    o_t = Σ_{s≤t} φ(q_t)·φ(k_s) v_s / Σ_{s≤t} φ(q_t)·φ(k_s)

Based: φ is the 2nd-order Taylor expansion of exp, φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d), over a
feature dim d = 16 per head. ReBased: φ(x) = (γ ⊙ LayerNorm(x) + β)⊗², i.e. a learnable quadratic
kernel φ(q)·φ(k) = (q̃·k̃)². Both maps live in ``feature_maps.py``; the state is the ``gla`` op's
normalised state (values plus the running Σ φ(k)).

Based's sliding-window softmax attention (exact recall of the last few tokens) is, in the paper, its
own layers of the stack (an ``attention`` layer with ``AttentionConfig.sliding_window`` in the model
pattern). ``MixerConfig.based_window > 0`` instead adds it inside the Based layer as a parallel branch
(``y = based(x) + window_attention(x)``), off by default.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import ops  # attribute access at call time (see common.py)
from .attention import SoftmaxAttention
from .common import init_weights, op_options, op_run_options, qkv_projections, resolve_dims, state_get
from .config import AttentionConfig, MixerConfig
from .feature_maps import feature_map
from .registry import register_mixer

DEFAULT_FEATURE_DIM = 16  # the papers' feature dim per head


class _PolynomialLinearAttention(nn.Module):
    """Shared body: projections to ``H`` heads of feature dim ``d``, a feature map, normalised linear attention.

    State: ``{"kv": [B, H, F, V + 1]}``, ``F`` the expanded feature dim (last value column = Σ φ(k)).
    """

    name = ""
    kernel = ""

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig):
        super().__init__()
        name = self.name
        H, _, d, V = resolve_dims(hidden_size, mixer, attention, name, default_head_k_dim=DEFAULT_FEATURE_DIM)
        if mixer.feature_map not in ("", self.kernel):
            raise ValueError(f"{name}: feature_map={mixer.feature_map!r} is not supported; {name} uses {self.kernel!r}")
        self.num_heads, self.feature_dim, self.head_v_dim = H, d, V
        self.mode, self.backend, self.chunk_size = op_options(mixer, name)
        self.feature_map = feature_map(self.kernel, d, name)
        self.q_proj, self.k_proj, self.v_proj = qkv_projections(hidden_size, H * d, H * d, H * V)
        self.o_proj = nn.Linear(H * V, hidden_size, bias=False)
        init_weights(self)

    def forward(self, x: torch.Tensor, state: dict | None = None, cu_seqlens: torch.Tensor | None = None):
        """x ``[batch, time, hidden]`` → (y ``[batch, time, hidden]``, ``{"kv": [B, H, F, V+1]}``)."""
        B, T, _ = x.shape
        H, d, V = self.num_heads, self.feature_dim, self.head_v_dim
        q = self.feature_map(self.q_proj(x).view(B, T, H, d))
        k = self.feature_map(self.k_proj(x).view(B, T, H, d))
        v = self.v_proj(x).view(B, T, H, V)
        o, kv = ops.gla(
            q, k, v, None, scale=1.0, normalize=True, initial_state=state_get(state, "kv"), output_final_state=True,
            cu_seqlens=cu_seqlens, **op_run_options(self, T),
        )
        return self.o_proj(o.reshape(B, T, H * V)), {"kv": kv}


@register_mixer("based")
class BasedLinearAttention(_PolynomialLinearAttention):
    """Based: Taylor-feature linear attention, ``φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d)``.

    Reads num_heads, head_dim (feature dim d, default 16), expand_v, mode, chunk_size, backend, and
    based_window: when > 0, a sliding-window softmax attention branch (the ``attention`` mixer with
    ``num_heads`` heads of the value head dim, rotary positions, ``sliding_window = based_window``) is
    added to the output; its decode state is ``state["window"]``.
    """

    name, kernel = "based", "taylor"

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        super().__init__(hidden_size, mixer, attention)
        if mixer.based_window < 0:
            raise ValueError(f"based: based_window={mixer.based_window} must be >= 0 (0: no sliding-window branch)")
        self.window_attention = None
        if mixer.based_window:
            window = dataclasses.replace(attention, num_heads=self.num_heads, num_kv_heads=0, head_dim=self.head_v_dim,
                                         sliding_window=mixer.based_window)
            self.window_attention = SoftmaxAttention(hidden_size, mixer, window, layer_idx, num_layers)

    def forward(self, x: torch.Tensor, state: dict | None = None, cu_seqlens: torch.Tensor | None = None):
        """x ``[batch, time, hidden]`` → (y ``[batch, time, hidden]``, ``{"kv": ..., "window": ...}``)."""
        y, new_state = super().forward(x, state, cu_seqlens)
        if self.window_attention is not None:
            y_window, new_state["window"] = self.window_attention(x, state_get(state, "window"), cu_seqlens)
            y = y + y_window
        return y, new_state


@register_mixer("rebased")
class ReBasedLinearAttention(_PolynomialLinearAttention):
    """ReBased: learnable quadratic kernel ``φ(x) = (γ ⊙ LayerNorm(x) + β)^⊗2`` (γ, β ``[d]`` shared by heads,
    as in the paper), ``φ(q)·φ(k) = (q̃·k̃)²``. Reads the same fields as Based."""

    name, kernel = "rebased", "rebased"

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        super().__init__(hidden_size, mixer, attention)
