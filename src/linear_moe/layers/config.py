"""Configuration of the token mixers: softmax attention and the linear mixers."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AttentionConfig:
    """Softmax-attention options (the `N` / `*` layers of a pattern, and the heads default for linear mixers)."""

    num_heads: int = 4
    num_kv_heads: int = 0          # 0: same as num_heads (multi-head); fewer: grouped-query attention
    head_dim: int = 0              # 0: hidden_size // num_heads
    rope_theta: float = 10000.0
    qkv_bias: bool = False         # Qwen2 uses a bias on q/k/v
    sliding_window: int = 0        # 0: full causal attention (Mixtral may use a window)


@dataclass
class MixerConfig:
    """Options of the linear token mixers (the `L` / `M` layers).

    Option names follow the original Linear-MoE / fla names. Every field has a default that gives
    the paper's formulation for the chosen mixer; 0 / "" / "auto" mean "the mixer's own default".

    ``use_short_conv``: ``"auto"`` (or None) follows each mixer's paper: short causal convolutions on
    q/k/v in DeltaNet, Gated DeltaNet and MoM, on x/B/C in Mamba2; none in HGRN2 and GSA. True / False
    force them on or off for those six mixers (``conv_size`` sets their width). The other mixers
    (GLA, RetNet, Lightning, linear attention / LASP-2, Based, ReBased, RWKV6) have no short
    convolution and do not read it. (It is ``"auto"`` rather than None because TOML cannot hold None.)
    """

    num_heads: int = 0             # 0: AttentionConfig.num_heads
    num_kv_heads: int = 0          # 0: num_heads
    head_dim: int = 0              # 0: derived from hidden_size, num_heads and expand_k
    expand_k: float = 1.0
    expand_v: float = 1.0
    feature_map: str = ""          # identity | elu | relu | swish | taylor | ...
    gate_fn: str = "swish"         # activation of the output gate
    output_norm: str = "rmsnorm"   # rmsnorm | groupnorm | none
    use_output_gate: bool = True
    use_short_conv: bool | str | None = "auto"  # "auto": the mixer's own default (see above); True / False override
    conv_size: int = 4
    mode: str = "auto"             # chunk | fused_recurrent | auto
    chunk_size: int = 64
    gate_logit_normalizer: float = 16.0
    num_slots: int = 64            # GSA
    num_memories: int = 4          # MoM
    topk_memories: int = 2         # MoM
    state_size: int = 64           # Mamba2 (d_state)
    backend: str = ""              # "" / auto | torch | fla | triton
    shared_memory: bool = False    # MoM: add one always-on memory beside the routed ones
    memory_aux_loss_coef: float = 0.01  # MoM: weight of the memory load-balancing loss (in mixer.aux_loss)
    normalize: bool = False        # linear_attention / lasp2: divide by φ(q)·Σφ(k) (Katharopoulos); off = output norm only
    gate_low_rank_dim: int = 16    # GLA: rank of the data-dependent forget-gate projection
    based_window: int = 0          # Based: add a sliding-window softmax attention branch over this many tokens (0: off)
