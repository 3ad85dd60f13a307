"""HGRN2 (Qin et al. 2024, "HGRN2: Gated Linear RNNs with State Expansion").

A gated linear RNN whose forget gate ``f_t`` also sets the input gate ``1 - f_t``; state expansion
turns the element-wise recurrence into an outer product, so it is a GLA with

    f_t = λ + (1 - λ) σ(W_f x_t)           forget gate, lower-bounded by λ ∈ [0, 1) per layer
    q_t = swish(W_q x_t),  k_t = 1 - f_t,  v_t = W_i x_t
    S_t = diag(f_t) S_{t-1} + k_tᵀ v_t,    o_t = q_t S_t
    y_t = W_o RMSNorm(o_t)

Lower bounds: in HGRN they grow with depth (the first layer has none), so upper layers keep longer
memories. HGRN parametrises all layers' bounds jointly (a cumulative softmax over layers); with one
module per layer we give each layer its own learnable bound ``λ = σ(θ)`` per forget channel, started
where the joint form starts (``layer_idx / num_layers``); layer 0 has no bound.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops  # attribute access at call time (see common.py)
from .common import (
    RMSNorm, ShortConvQKV, init_weights, op_options, op_run_options, resolve_dims, short_conv_enabled, state_get,
)
from .config import AttentionConfig, MixerConfig
from .registry import register_mixer


@register_mixer("hgrn2")
class HGRN2(nn.Module):
    """HGRN2 token mixer. Reads num_heads, head_dim / expand_k (state expansion per head), expand_v,
    use_short_conv (default off, as the paper; on: convolutions without activation, as in fla's HGRN2), conv_size,
    mode, chunk_size, backend.

    State: ``{"hidden": [B, H, K, V]}`` plus ``conv_q / conv_f / conv_i [B, C, W-1]`` with short convolutions.
    """

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        super().__init__()
        name = "hgrn2"
        H, _, K, V = resolve_dims(hidden_size, mixer, attention, name)
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"hgrn2: layer_idx={layer_idx} must be in [0, num_layers={num_layers})")
        self.num_heads, self.head_k_dim, self.head_v_dim = H, K, V
        self.mode, self.backend, self.chunk_size = op_options(mixer, name)
        key_dim, value_dim = H * K, H * V

        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.f_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.i_proj = nn.Linear(hidden_size, value_dim, bias=False)
        # The paper has no short convolution; with use_short_conv=True: q_conv / f_conv / i_conv, no activation.
        self.use_short_conv = short_conv_enabled(mixer, False, name)
        self.short_convs = ShortConvQKV(self, {"q": key_dim, "f": key_dim, "i": value_dim}, enabled=self.use_short_conv,
                                        conv_size=mixer.conv_size, activation=None, mixer=name)
        if layer_idx > 0:
            start = layer_idx / num_layers
            self.lower_bound_logit = nn.Parameter(torch.full((key_dim,), math.log(start / (1 - start))))
        else:
            self.register_parameter("lower_bound_logit", None)
        self.norm = RMSNorm(value_dim, eps=1e-5)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        init_weights(self)

    def log_forget(self, f: torch.Tensor) -> torch.Tensor:
        """log f_t from the forget logits ``[..., key_dim]``, in float32."""
        log_f = F.logsigmoid(f.float())
        if self.lower_bound_logit is None:
            return log_f
        # log(λ + (1 - λ) σ(z)) computed in log space, so f stays representable close to 1.
        lb = self.lower_bound_logit.float()
        return torch.logaddexp(F.logsigmoid(lb), F.logsigmoid(-lb) + log_f)

    def forward(self, x: torch.Tensor, state: dict | None = None, cu_seqlens: torch.Tensor | None = None):
        """x ``[batch, time, hidden]`` → (y ``[batch, time, hidden]``, state dict)."""
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        new_state: dict = {}
        q, f, i = self.short_convs(self, (self.q_proj(x), self.f_proj(x), self.i_proj(x)), state, new_state, cu_seqlens)
        log_f = self.log_forget(f).view(B, T, H, K)
        k = -torch.expm1(log_f)  # 1 - f_t
        o, new_state["hidden"] = ops.gla(
            F.silu(q).view(B, T, H, K), k.to(x.dtype), i.view(B, T, H, V), log_f, scale=1.0,
            initial_state=state_get(state, "hidden"), output_final_state=True, cu_seqlens=cu_seqlens,
            **op_run_options(self, T),
        )
        return self.o_proj(self.norm(o.reshape(B, T, H * V))), new_state
