"""DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length")
and Gated DeltaNet (Yang et al. 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule").

Per head, keys and queries L2-normalised, ``β_t = sigmoid(x_t W_β) ∈ (0, 1)``:

    DeltaNet:        S_t = (I - β_t k_tᵀ k_t) S_{t-1} + β_t k_tᵀ v_t
    Gated DeltaNet:  S_t = a_t (I - β_t k_tᵀ k_t) S_{t-1} + β_t k_tᵀ v_t,
                     log a_t = -exp(A_log) · softplus(x_t W_a + dt_bias)    (Mamba2's decay)
    o_t = K^-0.5 · q_t S_t

q, k, v pass through short causal convolutions with SiLU (without them, through SiLU alone). DeltaNet's
output is ``o_proj(norm(o))``; Gated DeltaNet's is ``o_proj(norm(o) ⊙ swish(x W_g))``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .common import (
    OutputNormGate, ShortConvQKV, fused_projections, init_weights, op_options, op_run_options,
    qkv_projections, resolve_dims, short_conv_enabled, state_get, upcast,
)
from .config import AttentionConfig, MixerConfig
from .registry import register_mixer


def init_dt_bias_(dt_bias: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
    """Mamba's time-step bias: ``softplus(dt_bias) = dt`` with dt log-uniform in ``[dt_min, dt_max]``."""
    with torch.no_grad():
        dt = torch.exp(torch.rand_like(dt_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus


class _DeltaRuleAttention(nn.Module):
    """Shared body of DeltaNet and Gated DeltaNet (``gated`` adds the decay and the output gate)."""

    gated = False

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        super().__init__()
        name = self.mixer_name
        H, _, K, V = resolve_dims(hidden_size, mixer, attention, name)
        self.num_heads, self.head_k_dim, self.head_v_dim = H, K, V
        self.mode, self.backend, self.chunk_size = op_options(mixer, name)

        self.q_proj, self.k_proj, self.v_proj = qkv_projections(hidden_size, H * K, H * K, H * V)
        self.b_proj = nn.Linear(hidden_size, H, bias=False)
        # Parameters ``convs.q.weight``, ...; without convolutions, SiLU alone (as the paper's ablation).
        self.use_short_conv = short_conv_enabled(mixer, True, name)
        self.short_convs = ShortConvQKV(self, {"q": H * K, "k": H * K, "v": H * V}, enabled=self.use_short_conv,
                                        conv_size=mixer.conv_size, activation="silu", fallback=F.silu,
                                        container="convs", mixer=name)
        if self.gated:
            self.a_proj = nn.Linear(hidden_size, H, bias=False)
            self.A_log = nn.Parameter(torch.empty(H))
            self.dt_bias = nn.Parameter(torch.empty(H))
            self.g_proj = nn.Linear(hidden_size, H * V, bias=False) if mixer.use_output_gate else None
        self.out_norm = OutputNormGate(V, norm=mixer.output_norm, gate_fn=mixer.gate_fn if self.gated else "none",
                                       mixer=name, backend=self.backend)
        self.o_proj = nn.Linear(H * V, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)
        if self.gated:
            with torch.no_grad():
                self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1e-4, 16).log())  # a = exp(-A·dt), A ∈ (0, 16]
            init_dt_bias_(self.dt_bias)

    def forward(self, x: torch.Tensor, state: dict | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """x ``[batch, time, hidden]`` → (y ``[batch, time, hidden]``, state)."""
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        new_state: dict = {}
        gated = self.gated
        # one matmul for every input projection (the parameters stay separate)
        xq, xk, xv, xb, xa, gate = fused_projections(x, self.q_proj, self.k_proj, self.v_proj, self.b_proj,
                                                     self.a_proj if gated else None, self.g_proj if gated else None)
        q, k, v = self.short_convs(self, (xq, xk, xv), state, new_state, cu_seqlens)
        q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V)  # L2-normalised by the op
        beta = torch.sigmoid(upcast(xb))
        log_decay = None
        if gated:
            log_decay = -upcast(self.A_log).exp() * F.softplus(upcast(xa) + upcast(self.dt_bias))
        o, new_state["recurrent"] = ops.delta_rule(
            q, k, v, beta, log_decay, scale=K ** -0.5, initial_state=state_get(state, "recurrent"),
            output_final_state=True, cu_seqlens=cu_seqlens, qk_l2norm=True, **op_run_options(self, T),
        )
        y = self.o_proj(self.out_norm(o, gate).reshape(B, T, H * V))
        return y, new_state


@register_mixer("deltanet")
class DeltaNet(_DeltaRuleAttention):
    """DeltaNet token mixer.

    Reads ``MixerConfig``: num_heads, head_dim / expand_k, expand_v, use_short_conv (default on), conv_size,
    output_norm, mode, chunk_size, backend. The paper's layer has no output gate (``use_output_gate`` and
    ``gate_fn`` are not read) and fixes q, k to SiLU + L2 norm (``feature_map`` is not read).

    State: ``{"recurrent": [batch, heads, K, V], "conv_q" / "conv_k": [batch, heads*K, W-1],
    "conv_v": [batch, heads*V, W-1]}`` (convs only with ``use_short_conv``).
    """


@register_mixer("gated_deltanet")
class GatedDeltaNet(_DeltaRuleAttention):
    """Gated DeltaNet token mixer: DeltaNet plus Mamba2's scalar decay and a gated output norm.

    Reads what DeltaNet reads plus ``use_output_gate`` and ``gate_fn`` (swish). Extra parameters:
    ``A_log [heads]`` (A ∈ (0, 16]) and ``dt_bias [heads]`` (softplus(dt_bias) ∈ [1e-3, 0.1]). Same state.
    """

    gated = True
