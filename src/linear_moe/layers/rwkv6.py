"""RWKV-6 "Finch" time mixing (Peng et al. 2024, "Eagle and Finch").

With ``x'_t = x_{t-1}`` (token shift) and ``δ_t = x'_t - x_t``:

    m_t^* = μ_* + W2_* tanh(W1 (x_t + δ_t ⊙ μ_x))       data-dependent lerp (ddlerp) for * ∈ {w,k,v,r,g}
    x_t^* = x_t + δ_t ⊙ m_t^*
    r, k, v = W_r x^r, W_k x^k, W_v x^v;   g = silu(W_g x^g)
    w_t = d_0 + D2 tanh(D1 x^w);   decay a_t = exp(-exp(w_t))      (data-dependent, per key channel)
    S_t = diag(a_t) S_{t-1} + k_tᵀ v_t
    o_t = r_t (S_{t-1} + diag(u) k_tᵀ v_t)                    (bonus u for the current token)
    y_t = W_o (GroupNorm_H(o_t) ⊙ g_t)

The recurrence is the ``gla`` op with vector decay and ``bonus``; the rest is projections.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops  # attribute access at call time (see common.py)
from ..ops._checks import matmul_dtype
from .common import init_weights, op_options, op_run_options, resolve_dims, state_get, upcast
from .config import AttentionConfig, MixerConfig
from .registry import register_mixer

MIX_LORA_RANK = 32     # TIME_MIX_EXTRA_DIM of the reference RWKV-6
DECAY_LORA_RANK = 64   # TIME_DECAY_EXTRA_DIM
GROUP_NORM_EPS = 64e-5  # 1e-5 * head_size_divisor², as in the reference ln_x


def token_shift(x: torch.Tensor, previous: torch.Tensor | None, cu_seqlens: torch.Tensor | None):
    """The previous token of each position, ``x [B, T, C]`` → (shifted ``[B, T, C]``, last ``[B|N, C]``).

    ``previous`` ``[B, C]`` (``[N, C]`` with packed documents) is the token before the first one; zeros
    when None. With ``cu_seqlens`` each document starts from its own ``previous`` row.
    """
    B, T, C = x.shape
    if cu_seqlens is None:
        first = x.new_zeros(B, 1, C) if previous is None else previous.to(x.dtype).unsqueeze(1)
        return torch.cat([first, x[:, :-1]], dim=1), x[:, -1]
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    n = starts.numel()
    first = x.new_zeros(n, C) if previous is None else previous.to(x.dtype)
    shifted = torch.cat([x.new_zeros(B, 1, C), x[:, :-1]], dim=1).index_copy(1, starts, first.unsqueeze(0))
    return shifted, x[0, ends - 1]


@register_mixer("rwkv6")
class RWKV6TimeMix(nn.Module):
    """RWKV-6 time mixing. Reads num_heads, head_dim / expand_k (key dim per head), expand_v, mode,
    chunk_size, backend. State: ``{"shift": [B, C], "wkv": [B, H, K, V]}``."""

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        super().__init__()
        name = "rwkv6"
        H, _, K, V = resolve_dims(hidden_size, mixer, attention, name)
        self.num_heads, self.head_k_dim, self.head_v_dim = H, K, V
        self.mode, self.backend, self.chunk_size = op_options(mixer, name)
        C, key_dim, value_dim = hidden_size, H * K, H * V

        self.mix_x = nn.Parameter(torch.zeros(C))
        self.mix_bias = nn.Parameter(torch.zeros(5, C))                 # μ_w, μ_k, μ_v, μ_r, μ_g
        self.mix_w1 = nn.Parameter(torch.zeros(C, 5 * MIX_LORA_RANK))
        self.mix_w2 = nn.Parameter(torch.zeros(5, MIX_LORA_RANK, C))
        self.decay_base = nn.Parameter(torch.zeros(key_dim))           # d_0
        self.decay_w1 = nn.Parameter(torch.zeros(C, DECAY_LORA_RANK))
        self.decay_w2 = nn.Parameter(torch.zeros(DECAY_LORA_RANK, key_dim))
        self.bonus = nn.Parameter(torch.zeros(H, self.head_k_dim))     # u
        self.r_proj = nn.Linear(C, key_dim, bias=False)
        self.k_proj = nn.Linear(C, key_dim, bias=False)
        self.v_proj = nn.Linear(C, value_dim, bias=False)
        self.g_proj = nn.Linear(C, value_dim, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(value_dim))
        self.norm_bias = nn.Parameter(torch.zeros(value_dim))
        self.o_proj = nn.Linear(value_dim, C, bias=False)
        init_weights(self)
        self._init_like_reference(layer_idx, num_layers)

    @torch.no_grad()
    def _init_like_reference(self, layer_idx: int, num_layers: int) -> None:
        # Depth-dependent starting points of the reference implementation: lower layers shift more of
        # the previous token in and forget faster.
        C, D = self.mix_x.numel(), self.decay_base.numel()
        r01 = layer_idx / max(num_layers - 1, 1)
        r10 = 1.0 - layer_idx / num_layers
        ddd = torch.arange(C) / C
        self.mix_x.copy_(1 - ddd ** r10)
        self.mix_bias.copy_(torch.stack([
            1 - ddd ** r10, 1 - ddd ** r10, 1 - (ddd ** r10 + 0.3 * r01), 1 - ddd ** (0.5 * r10), 1 - ddd ** (0.5 * r10),
        ]))
        self.mix_w2.uniform_(-0.01, 0.01)
        self.decay_w2.uniform_(-0.01, 0.01)
        n = torch.arange(D) / max(D - 1, 1)
        self.decay_base.copy_(-6 + 5 * n ** (0.7 + 1.3 * r01))
        zigzag = ((torch.arange(D) + 1) % 3 - 1) * 0.1
        self.bonus.copy_((r01 * (1 - n) + zigzag).view_as(self.bonus))

    def forward(self, x: torch.Tensor, state: dict | None = None, cu_seqlens: torch.Tensor | None = None):
        """x ``[batch, time, hidden]`` → (y ``[batch, time, hidden]``, state dict)."""
        B, T, C = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        # The token-shift lerps run in the projections' dtype: under autocast an fp32 residual stream and the fp32
        # μ parameters made the five [B, T, C] mixes fp32 tensors (and their gradients), each cast again by its
        # projection. The shift state keeps x's dtype and holds the same rounded token the full form used.
        dt = matmul_dtype(x)
        xs = x.to(dt)
        shifted, last = token_shift(xs, state_get(state, "shift"), cu_seqlens)
        delta = shifted - xs
        lora = torch.tanh(torch.addcmul(xs, delta, self.mix_x.to(dt)) @ self.mix_w1).view(B, T, 5, -1)
        mix = torch.einsum("btfr,frc->btfc", lora, self.mix_w2.to(lora.dtype)) + self.mix_bias.to(lora.dtype)
        xw, xk, xv, xr, xg = torch.addcmul(xs.unsqueeze(2), delta.unsqueeze(2), mix.to(dt)).unbind(2)

        r = self.r_proj(xr).view(B, T, H, K)
        k = self.k_proj(xk).view(B, T, H, K)
        v = self.v_proj(xv).view(B, T, H, V)
        g = F.silu(self.g_proj(xg))
        w = self.decay_base + torch.tanh(xw @ self.decay_w1) @ self.decay_w2
        log_decay = -torch.exp(w.float()).view(B, T, H, K)
        o, wkv = ops.gla(
            r, k, v, log_decay, bonus=self.bonus, scale=1.0, initial_state=state_get(state, "wkv"), output_final_state=True,
            cu_seqlens=cu_seqlens, **op_run_options(self, T),
        )
        # GroupNorm with one group per head = LayerNorm over each head's channels, then a per-channel affine.
        # (affine in fp32, then one cast to the gate's dtype: o_proj's input)
        o = F.layer_norm(upcast(o), (V,), eps=GROUP_NORM_EPS).reshape(B, T, H * V)
        o = torch.addcmul(upcast(self.norm_bias), o, upcast(self.norm_weight)).to(g.dtype) * g
        return self.o_proj(o), {"shift": last.to(x.dtype), "wkv": wkv}
