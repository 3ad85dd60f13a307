"""Mamba2 (Dao & Gu 2024, "Transformers are SSMs"), computed as state-space duality through the ``gla`` op.

Per head h (head dim P, state size N; B and C shared by the heads of a group, like GQA):

    x_t, B_t, C_t = silu(conv(x W_x, x W_B, x W_C))       short causal conv over [x | B | C]
    Δ_t = softplus(x W_Δ + dt_bias)                       [H]
    h_t = exp(Δ_t A) h_{t-1} + B_tᵀ (Δ_t x_t)             [N, P],  A = -exp(A_log) < 0
    y_t = C_t h_t + D ⊙ x_t
    out = o_proj(RMSNorm(y ⊙ silu(z)))                     z = x W_z; gate *before* the norm (Mamba2's
                                                           norm_before_gate=False), the norm per group

This is ``gla(q=C, k=B, v=Δ·x, log_decay=Δ·A, scale=1)`` with a scalar data-dependent decay; no mamba-ssm.
The input projection is written as separate ``nn.Linear`` pieces (z, x, BC, Δ) — the same function as
Mamba2's fused ``in_proj`` — so each reads on its own and can be sharded by heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops._checks import matmul_dtype
from .common import (
    ShortConvolution, choose, init_weights, op_options, op_run_options, per_head, repeat_heads, short_conv_enabled,
    state_get, upcast,
)
from .config import AttentionConfig, MixerConfig
from .deltanet import init_dt_bias_
from .registry import register_mixer


@register_mixer("mamba2")
class Mamba2(nn.Module):
    """Mamba2 token mixer.

    Reads ``MixerConfig``: num_heads (0: attention's), head_dim (P; 0: ``2 * expand_v * hidden / heads``,
    i.e. Mamba2's expand = 2), num_kv_heads (number of B/C groups; 0: 1 group, as Mamba2), state_size (N),
    use_short_conv (default on), conv_size, use_output_gate (the z gate), output_norm (rmsnorm | none), mode,
    chunk_size, backend. Parameters beyond the projections: ``A_log [H]`` (A ∈ [1, 16]), ``dt_bias [H]``,
    ``D [H]`` (ones), ``norm_weight [H*P]``.

    State: ``{"recurrent": [batch, heads, N, P], "conv_xbc": [batch, H*P + 2*G*N, W-1]}``.
    """

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        super().__init__()
        name = "mamba2"
        H = mixer.num_heads or attention.num_heads
        G = mixer.num_kv_heads or 1
        if H < 1 or G < 1 or H % G:
            raise ValueError(f"mamba2: num_heads={H} must be >= 1 and a multiple of the group count num_kv_heads={G}")
        if mixer.state_size < 1:
            raise ValueError(f"mamba2: state_size={mixer.state_size} must be >= 1")
        self.num_heads, self.num_groups, self.state_size = H, G, N = H, G, mixer.state_size
        self.head_dim = P = mixer.head_dim or per_head(2 * hidden_size * mixer.expand_v, H, "2 * hidden_size * expand_v", name)
        self.norm = choose(mixer.output_norm, ("rmsnorm", "none"), "output_norm", name)
        self.mode, self.backend, self.chunk_size = op_options(mixer, name)
        self.eps = 1e-5
        d_inner = H * P

        self.z_proj = nn.Linear(hidden_size, d_inner, bias=False) if mixer.use_output_gate else None
        self.x_proj = nn.Linear(hidden_size, d_inner, bias=False)
        self.bc_proj = nn.Linear(hidden_size, 2 * G * N, bias=False)
        self.dt_proj = nn.Linear(hidden_size, H, bias=False)
        self.use_short_conv = short_conv_enabled(mixer, True, name)
        self.conv = (ShortConvolution(d_inner + 2 * G * N, mixer.conv_size, activation="silu", bias=True, mixer=name)
                     if self.use_short_conv else None)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.norm_weight = nn.Parameter(torch.empty(d_inner)) if self.norm == "rmsnorm" else None
        self.o_proj = nn.Linear(d_inner, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
            self.D.fill_(1.0)
            if self.norm_weight is not None:
                self.norm_weight.fill_(1.0)
        init_dt_bias_(self.dt_bias)

    def forward(self, x: torch.Tensor, state: dict | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """x ``[batch, time, hidden]`` → (y ``[batch, time, hidden]``, state)."""
        Bsz, T, _ = x.shape
        H, G, N, P = self.num_heads, self.num_groups, self.state_size, self.head_dim
        new_state: dict = {}
        xbc = torch.cat([self.x_proj(x), self.bc_proj(x)], dim=-1)
        if self.conv is not None:
            xbc, new_state["conv_xbc"] = self.conv(xbc, state_get(state, "conv_xbc"), cu_seqlens)
        else:
            xbc = F.silu(xbc)
        xs, b, c = xbc.split([H * P, G * N, G * N], dim=-1)
        xs = xs.view(Bsz, T, H, P)
        b = repeat_heads(b.view(Bsz, T, G, N), H // G)
        c = repeat_heads(c.view(Bsz, T, G, N), H // G)
        dt = F.softplus(upcast(self.dt_proj(x)) + upcast(self.dt_bias))        # [B, T, H]
        log_decay = -upcast(self.A_log).exp() * dt                            # Δ·A ≤ 0
        y, new_state["recurrent"] = ops.gla(
            c, b, (upcast(xs) * dt[..., None]).to(xs.dtype), log_decay, scale=1.0,
            initial_state=state_get(state, "recurrent"), output_final_state=True, cu_seqlens=cu_seqlens,
            **op_run_options(self, T),
        )
        # D skip, z gate, then RMS over each group's channels (Mamba2's group_size = d_inner / ngroups) and one
        # weight per channel: one Triton kernel each way on CUDA. Written in the dtype o_proj computes in (under
        # autocast it would cast to that anyway: the same rounding, one pass less)
        y = ops.ssm_output(y, xs, self.D, None if self.z_proj is None else self.z_proj(x), self.norm_weight,
                           groups=G, eps=self.eps, out_dtype=matmul_dtype(x))
        return self.o_proj(y), new_state
