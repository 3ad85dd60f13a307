"""Tensor math for the token mixers: pure functions over `[batch, time, heads, dim]`, no modules.

* `gla`: gated linear attention (linear attention, Retention, Mamba2 SSD, GLA, HGRN2, RWKV6).
* `delta_rule`: (gated) delta rule (DeltaNet, Gated DeltaNet).
* `short_conv`: short causal depthwise convolution.
* `gsa`: gated slot attention (two coupled `gla` passes; fla's chunk_gsa on GPU).
* `norm_gate`: a mixer's output norm times its activated gate (fla's fused kernel on GPU).
* `ssm_output`: Mamba2's output stage, D skip, z gate and grouped RMSNorm (one Triton kernel on GPU).
* `causal_attention`: softmax attention with GQA, varlen and sliding windows.
* `apply_rotary`, `rotary_cos_sin`: RoPE.
* `gla_chunk_state`, `gla_state_output`, `delta_rule_chunk_state`, `delta_rule_state_output`: the
  separable pieces sequence parallelism (LASP-2) composes across devices.

Each recurrence has a step-by-step form and a chunked form in pure PyTorch; `backends/` holds faster
kernels that the public functions dispatch to on GPU.
"""
from .attention import causal_attention
from .conv import short_conv
from .delta_rule import delta_rule
from .gla import gla
from .gsa import gsa
from .lasp import delta_rule_chunk_state, delta_rule_state_output, gla_chunk_state, gla_state_output
from .norm_gate import norm_gate
from .rotary import apply_rotary, rotary_cos_sin
from .ssm_output import ssm_output

__all__ = [
    "apply_rotary", "causal_attention", "delta_rule", "delta_rule_chunk_state", "delta_rule_state_output",
    "gla", "gla_chunk_state", "gla_state_output", "gsa", "norm_gate", "rotary_cos_sin", "short_conv", "ssm_output",
]
