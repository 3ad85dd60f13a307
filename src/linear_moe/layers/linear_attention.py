"""Basic linear attention (Katharopoulos et al. 2020) and the form LASP-2 (Sun et al. 2025) trains.

Per head, with a feature map φ and no decay:

    S_t = S_{t-1} + φ(k_t)ᵀ v_t                  [K', V]   (K' = φ's output width)
    o_t = scale · φ(q_t) S_t                     (normalize=False: then the output norm keeps o bounded)
    o_t = φ(q_t) S_t / (φ(q_t) · Σ_{s≤t} φ(k_s))  (normalize=True: the paper's denominator)
    y_t = o_proj(norm(o_t))

``linear_attention`` defaults to φ = elu + 1 (the paper); ``lasp2`` is the same layer with φ = identity,
the "basic linear attention" LASP-2 parallelises over the sequence (no decay, output norm, no gate).
Keys and values may have fewer heads than queries (``num_kv_heads``), shared as in grouped-query attention.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .common import (
    OutputNormGate, grouped_qkv, init_weights, op_options, op_run_options, qkv_projections, resolve_dims, state_get,
)
from .config import AttentionConfig, MixerConfig
from .feature_maps import feature_map
from .registry import register_mixer


@register_mixer("linear_attention")
class LinearAttention(nn.Module):
    """Linear attention token mixer.

    Reads ``MixerConfig``: num_heads, num_kv_heads, head_dim (else ``hidden * expand_k / heads``), expand_v,
    feature_map (default elu; any name of ``feature_maps.FEATURE_MAPS``), normalize, output_norm, mode,
    chunk_size, backend. The paper's layer has no short convolution and no output gate, so
    ``use_short_conv`` / ``use_output_gate`` / ``gate_fn`` are not read.

    State: ``{"recurrent": [batch, heads, K', V (+1 with normalize)]}`` (fp32).
    """

    default_feature_map = "elu"

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        super().__init__()
        name = self.mixer_name
        H, KVH, K, V = resolve_dims(hidden_size, mixer, attention, name, grouped_kv=True)
        self.num_heads, self.num_kv_heads, self.head_k_dim, self.head_v_dim = H, KVH, K, V
        self.feature_map = feature_map(mixer.feature_map or self.default_feature_map, K, name)
        self.normalize = mixer.normalize
        self.mode, self.backend, self.chunk_size = op_options(mixer, name)

        self.q_proj, self.k_proj, self.v_proj = qkv_projections(hidden_size, H * K, KVH * K, KVH * V)
        self.out_norm = OutputNormGate(V, norm=mixer.output_norm, gate_fn="none", mixer=name, backend=self.backend)
        self.o_proj = nn.Linear(H * V, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)

    def forward(self, x: torch.Tensor, state: dict | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """x ``[batch, time, hidden]`` → (y ``[batch, time, hidden]``, state)."""
        B, T, _ = x.shape
        q, k, v = grouped_qkv(self, x, self.feature_map)
        # With the denominator the scale cancels; without it, K'^-0.5 keeps φ(q)·φ(k) of order one.
        scale = 1.0 if self.normalize else q.shape[-1] ** -0.5
        o, recurrent = ops.gla(
            q, k, v, None, scale=scale, normalize=self.normalize, initial_state=state_get(state, "recurrent"),
            output_final_state=True, cu_seqlens=cu_seqlens, **op_run_options(self, T),
        )
        y = self.o_proj(self.out_norm(o).reshape(B, T, -1))
        return y, {"recurrent": recurrent}


@register_mixer("lasp2")
class LASP2LinearAttention(LinearAttention):
    """LASP-2's basic linear attention: ``linear_attention`` with φ = identity by default.

    Same options and state as :class:`LinearAttention`; sequence parallelism is applied from outside
    (``parallel/``), this module is the single-device layer.
    """

    default_feature_map = "identity"
