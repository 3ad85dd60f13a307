"""Mixture-of-Memories (MoM; Du et al. 2025, "MoM: Linear Sequence Modeling with Mixture-of-Memories").

A router sends each token to ``k`` of ``M`` memories; each memory is a linear-attention state
(GLA or Gated DeltaNet) with its own key / value / gate projections, written only by its routed
tokens. The token reads every memory it was routed to with the shared query, and the reads are mixed
by the (renormalised top-k) routing weights; an optional shared memory is written and read by every
token with weight 1:

    p_t = softmax(W_r x_t),   R_t = top-k(p_t),   w_t[m] = p_t[m] / Σ_{j∈R_t} p_t[j]  (m ∈ R_t, else 0)
    S^m_t = update_m(S^m_{t-1}, x_t)  if m ∈ R_t  else  S^m_{t-1}
    o_t = Σ_m w_t[m] read(q_t, S^m_t)  (+ read(q_t, S^shared_t))
    y_t = W_o (RMSNorm(o_t) ⊙ swish(W_g x_t))

Routing as masking: all memories run over the whole sequence as extra heads of one op call; a token
not routed to memory m gets decay 1 and a zero key (and β = 0 for the delta rule), which leaves that
memory unchanged. Short convolutions run over the token sequence (before routing).

Load balancing: in training, ``forward`` sets ``self.aux_loss`` (a scalar tensor, already multiplied
by ``MixerConfig.memory_aux_loss_coef``) to the switch-style loss ``coef · M · Σ_m f_m P_m`` with
``f_m`` the fraction of routing slots given to memory m and ``P_m`` its mean router probability
(1·coef when perfectly balanced). The model adds it to the training loss. Outside training it is None.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops  # attribute access at call time (see common.py)
from .common import (
    OutputNormGate, ShortConvQKV, init_weights, op_options, op_run_options, qkv_projections, resolve_dims,
    short_conv_enabled, state_get,
)
from .config import AttentionConfig, MixerConfig
from .registry import register_mixer

def route(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits ``[B, T, M]`` → (weights ``[B, T, M]`` (zero off the top-k), routed mask ``[B, T, M]``,
    probabilities ``[B, T, M]``), all float32."""
    probs = logits.float().softmax(-1)
    top_p, top_i = probs.topk(topk, dim=-1)
    weights = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
    routed = torch.zeros_like(probs).scatter(-1, top_i, 1.0)
    return weights, routed, probs


def load_balancing_loss(routed: torch.Tensor, probs: torch.Tensor, topk: int) -> torch.Tensor:
    """Switch-style balance loss ``M · Σ_m f_m P_m`` from routed mask and probabilities ``[B, T, M]``."""
    M = probs.shape[-1]
    fraction = routed.reshape(-1, M).sum(0) / (routed.reshape(-1, M).shape[0] * topk)
    return M * (fraction * probs.reshape(-1, M).mean(0)).sum()


class _MixtureOfMemories(nn.Module):
    """Routing, projections, mixing and output shared by the GLA and Gated-DeltaNet memories.

    State: ``{"memories": [B, (M+S)*H, K, V]}`` (S = 1 with a shared memory, memory-major heads) plus
    ``conv_q [B, H*K, W-1]``, ``conv_k [B, (M+S)*H*K, W-1]``, ``conv_v [B, (M+S)*H*V, W-1]``.
    """

    name = ""

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig):
        super().__init__()
        name = self.name
        H, _, K, V = resolve_dims(hidden_size, mixer, attention, name)
        self.num_heads, self.head_k_dim, self.head_v_dim = H, K, V
        if mixer.num_memories < 1:
            raise ValueError(f"{name}: num_memories={mixer.num_memories} must be >= 1")
        if not 1 <= mixer.topk_memories <= mixer.num_memories:
            raise ValueError(f"{name}: topk_memories={mixer.topk_memories} must be in 1..num_memories={mixer.num_memories}")
        if mixer.memory_aux_loss_coef < 0:
            raise ValueError(f"{name}: memory_aux_loss_coef={mixer.memory_aux_loss_coef} must be >= 0")
        self.num_memories, self.topk = mixer.num_memories, mixer.topk_memories
        self.num_shared = int(mixer.shared_memory)
        self.aux_loss_coef = mixer.memory_aux_loss_coef
        self.mode, self.backend, self.chunk_size = op_options(mixer, name)
        E = self.num_memories + self.num_shared  # memories with their own state; the shared one is last

        self.router = nn.Linear(hidden_size, self.num_memories, bias=False)
        self.q_proj, self.k_proj, self.v_proj = qkv_projections(hidden_size, H * K, E * H * K, E * H * V)
        # q_conv / k_conv / v_conv with SiLU (the paper's Gated DeltaNet memories have them); without: SiLU alone.
        self.use_short_conv = short_conv_enabled(mixer, True, name)
        self.short_convs = ShortConvQKV(self, {"q": H * K, "k": E * H * K, "v": E * H * V}, enabled=self.use_short_conv,
                                        conv_size=mixer.conv_size, activation="silu", fallback=F.silu, mixer=name)
        self.g_proj = nn.Linear(hidden_size, H * V, bias=False) if mixer.use_output_gate else None
        self.out_norm = OutputNormGate(V, mixer.output_norm, mixer.gate_fn, mixer=name, backend=self.backend)
        self.o_proj = nn.Linear(H * V, hidden_size, bias=False)
        self.aux_loss: torch.Tensor | None = None

    def recur(self, x, q, k, v, routed, state, cu_seqlens):
        """Run all E memories as heads of one op call: q and k ``[B, T, E, H, K]`` (q expanded over E),
        v ``[B, T, E*H, V]``, routed ``[B, T, E]`` (1 where the token writes the memory) →
        (o ``[B, T, E*H, V]``, final state ``[B, E*H, K, V]``)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: dict | None = None, cu_seqlens: torch.Tensor | None = None):
        """x ``[batch, time, hidden]`` → (y ``[batch, time, hidden]``, state dict); sets ``self.aux_loss``."""
        B, T, _ = x.shape
        H, K, V, E = self.num_heads, self.head_k_dim, self.head_v_dim, self.num_memories + self.num_shared
        weights, routed, probs = route(self.router(x), self.topk)
        self.aux_loss = (self.aux_loss_coef * load_balancing_loss(routed, probs, self.topk)
                         if self.training else None)
        if self.num_shared:
            ones = routed.new_ones(B, T, 1)
            weights, routed = torch.cat([weights, ones], -1), torch.cat([routed, ones], -1)

        new_state: dict = {}
        q, k, v = self.short_convs(self, (self.q_proj(x), self.k_proj(x), self.v_proj(x)), state, new_state, cu_seqlens)
        q = q.view(B, T, 1, H, K).expand(B, T, E, H, K)
        o, new_state["memories"] = self.recur(
            x, q, k.view(B, T, E, H, K), v.view(B, T, E * H, V), routed, state, cu_seqlens)
        o = (o.view(B, T, E, H, V) * weights.to(o.dtype)[..., None, None]).sum(2)
        o = self.out_norm(o, None if self.g_proj is None else self.g_proj(x))
        return self.o_proj(o.reshape(B, T, H * V)), new_state

    def _op_kwargs(self, state, cu_seqlens, T) -> dict:
        return dict(scale=self.head_k_dim ** -0.5, initial_state=state_get(state, "memories"),
                    output_final_state=True, cu_seqlens=cu_seqlens, **op_run_options(self, T))


@register_mixer("mom_gla")
class MoMGLA(_MixtureOfMemories):
    """MoM with GLA memories: each memory's forget gate is ``logsigmoid(low-rank(x)) / gate_logit_normalizer``
    per key channel. Reads num_heads, head_dim / expand_k, expand_v, num_memories, topk_memories,
    shared_memory, memory_aux_loss_coef, gate_logit_normalizer, gate_low_rank_dim, use_short_conv (default on),
    conv_size, use_output_gate, mode, chunk_size, backend."""

    name = "mom_gla"

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        super().__init__(hidden_size, mixer, attention)
        if mixer.gate_logit_normalizer <= 0:
            raise ValueError(f"mom_gla: gate_logit_normalizer={mixer.gate_logit_normalizer} must be > 0")
        self.gate_logit_normalizer = mixer.gate_logit_normalizer
        E = self.num_memories + self.num_shared
        if mixer.gate_low_rank_dim < 1:
            raise ValueError(f"mom_gla: gate_low_rank_dim={mixer.gate_low_rank_dim} must be >= 1")
        self.gate_down = nn.Linear(hidden_size, mixer.gate_low_rank_dim, bias=False)
        self.gate_up = nn.Linear(mixer.gate_low_rank_dim, E * self.num_heads * self.head_k_dim, bias=True)
        init_weights(self)

    def recur(self, x, q, k, v, routed, state, cu_seqlens):
        B, T, E, H, K = k.shape
        log_decay = F.logsigmoid(self.gate_up(self.gate_down(x)).float()) / self.gate_logit_normalizer
        mask = routed[..., None, None]  # [B, T, E, 1, 1]
        log_decay = log_decay.view(B, T, E, H, K) * mask
        k = k * mask.to(k.dtype)
        return ops.gla(q.reshape(B, T, E * H, K), k.reshape(B, T, E * H, K), v, log_decay.view(B, T, E * H, K),
                   **self._op_kwargs(state, cu_seqlens, T))


@register_mixer("mom_gated_deltanet")
class MoMGatedDeltaNet(_MixtureOfMemories):
    """MoM with Gated DeltaNet memories (as in the paper's main model): per memory β = σ(W_b x) and
    log decay ``-exp(A_log) · softplus(W_a x + dt_bias)`` per head (``A_log``, ``dt_bias`` shared by the
    memories); q and k are L2-normalised per head. Reads the same fields as ``mom_gla`` except the gate normaliser."""

    name = "mom_gated_deltanet"

    def __init__(self, hidden_size: int, mixer: MixerConfig, attention: AttentionConfig, layer_idx: int, num_layers: int):
        super().__init__(hidden_size, mixer, attention)
        E, H = self.num_memories + self.num_shared, self.num_heads
        self.b_proj = nn.Linear(hidden_size, E * H, bias=False)
        self.a_proj = nn.Linear(hidden_size, E * H, bias=False)
        # Mamba-2 style decay parametrisation: A ~ U(0, 16) per head, dt ~ logU(1e-3, 1e-1) through softplus.
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1e-3, 16).log())
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        init_weights(self)

    def recur(self, x, q, k, v, routed, state, cu_seqlens):
        B, T, E, H, K = k.shape
        mask = routed[..., None]  # [B, T, E, 1]
        beta = torch.sigmoid(self.b_proj(x).float()).view(B, T, E, H) * mask
        log_decay = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float().view(B, T, E, H) + self.dt_bias.float())
        log_decay = log_decay * mask
        k = k * mask[..., None].to(k.dtype)  # the op's L2 norm keeps a zeroed key zero
        return ops.delta_rule(q.reshape(B, T, E * H, K), k.reshape(B, T, E * H, K), v, beta.view(B, T, E * H).to(v.dtype),
                          log_decay.view(B, T, E * H), qk_l2norm=True, **self._op_kwargs(state, cu_seqlens, T))
