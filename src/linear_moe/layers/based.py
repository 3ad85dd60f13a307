"""Based (Arora et al. 2024) and ReBased (Aksenov et al. 2024): normalised linear attention over a
small feature dim with a polynomial kernel.

    o_t = Σ_{s≤t} φ(q_t)·φ(k_s) v_s / Σ_{s≤t} φ(q_t)·φ(k_s)

Based: φ is the 2nd-order Taylor expansion of exp, φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d), over a
feature dim d = 16 per head. ReBased: φ(x) = (γ ⊙ LayerNorm(x) + β)⊗², i.e. a learnable quadratic
kernel φ(q)·φ(k) = (q̃·k̃)²/d. Quadratic terms are stored once per unordered pair (off-diagonal
terms scaled by √2), so the expanded dim is d(d+1)/2 rather than d².

Based's sliding-window softmax attention is, in the paper, a separate layer of the stack: use an
``attention`` layer with ``AttentionConfig.sliding_window`` in the model pattern for it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import gla
from .config import AttentionConfig, MixerConfig
from .gsa import num_heads_of, op_mode, split_dim
from .registry import register_mixer

DEFAULT_FEATURE_DIM = 16


def quadratic_features(x: torch.Tensor) -> torch.Tensor:
    """``[..., d]`` → ``[..., d(d+1)/2]`` with ``quadratic_features(x)·quadratic_features(y) = (x·y)²``."""
    d = x.shape[-1]
    i, j = torch.triu_indices(d, d, device=x.device)
    weight = torch.where(i == j, 1.0, 2.0 ** 0.5).to(x.dtype)
    return x[..., i] * x[..., j] * weight


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """Based's map ``[..., d]`` → ``[..., 1 + d + d(d+1)/2]``: φ(x)·φ(y) = 1 + x·y/√d + (x·y)²/(2d)."""
    d = x.shape[-1]
    return torch.cat([torch.ones_like(x[..., :1]), x * d ** -0.25, quadratic_features(x) * (2 * d) ** -0.5], dim=-1)


class _PolynomialLinearAttention(nn.Module):
    """Shared body: projections to ``H`` heads of feature dim ``d``, a feature map, normalised linear attention.

    State: ``{"kv": [B, H, F, V + 1]}`` where ``F`` is the expanded feature dim (last value column = Σ φ(k)).
    """

    name = ""

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig):
        super().__init__()
        self.num_heads = H = num_heads_of(mixer, attention, self.name)
        self.feature_dim = mixer.head_dim or DEFAULT_FEATURE_DIM
        self.head_v_dim = split_dim(int(hidden_size * mixer.expand_v), H, "value dim", self.name)
        self.mode = op_mode(mixer.mode, self.name)
        self.chunk_size = mixer.chunk_size
        self.backend = mixer.backend or None
        self.q_proj = nn.Linear(hidden_size, H * self.feature_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, H * self.feature_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, H * self.head_v_dim, bias=False)
        self.o_proj = nn.Linear(H * self.head_v_dim, hidden_size, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: dict | None = None, cu_seqlens: torch.Tensor | None = None):
        """x ``[batch, time, hidden]`` → (y ``[batch, time, hidden]``, ``{"kv": [B, H, F, V+1]}``)."""
        B, T, _ = x.shape
        H, d, V = self.num_heads, self.feature_dim, self.head_v_dim
        q = self.features(self.q_proj(x).view(B, T, H, d))
        k = self.features(self.k_proj(x).view(B, T, H, d))
        v = self.v_proj(x).view(B, T, H, V)
        o, kv = gla(
            q, k, v, None, scale=1.0, normalize=True, initial_state=None if state is None else state["kv"],
            output_final_state=True, cu_seqlens=cu_seqlens, mode=self.mode, chunk_size=self.chunk_size,
            backend=self.backend,
        )
        return self.o_proj(o.reshape(B, T, H * V)), {"kv": kv}


@register_mixer("based")
class BasedLinearAttention(_PolynomialLinearAttention):
    """Based: Taylor-feature linear attention. Reads num_heads, head_dim (feature dim, default 16),
    expand_v, mode, chunk_size, backend."""

    name = "based"

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        if mixer.feature_map not in ("", "taylor"):
            raise ValueError(f"based: feature_map={mixer.feature_map!r} is not supported; Based uses 'taylor'")
        super().__init__(hidden_size, mixer, attention)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return taylor_features(x)


@register_mixer("rebased")
class ReBasedLinearAttention(_PolynomialLinearAttention):
    """ReBased: learnable quadratic kernel ``(γ ⊙ LayerNorm(x) + β)⊗²`` scaled by ``1/√d`` (γ, β shared by
    heads, as in the paper). Reads the same fields as Based."""

    name = "rebased"

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        if mixer.feature_map not in ("", "rebased"):
            raise ValueError(f"rebased: feature_map={mixer.feature_map!r} is not supported; ReBased uses 'rebased'")
        super().__init__(hidden_size, mixer, attention)
        self.gamma = nn.Parameter(torch.ones(self.feature_dim))
        self.beta = nn.Parameter(torch.zeros(self.feature_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (self.feature_dim,), self.gamma, self.beta, eps=1e-5)
        return quadratic_features(x) * self.feature_dim ** -0.5
