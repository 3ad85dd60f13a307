"""Configuration of the channel mixer: Mixture-of-Experts (or dense) options."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MoEConfig:
    """Mixture-of-Experts options shared by every layer whose channel mixer is an MoE.

    Names follow Hugging Face / Megatron conventions where they exist.
    """

    num_experts: int = 8
    top_k: int = 2
    expert_hidden_size: int = 512          # width of each routed expert's SwiGLU
    router: str = "softmax"                # softmax | deepseek | sigmoid_bias
    norm_topk_prob: bool = True            # renormalise the top-k weights to sum to one
    routed_scaling_factor: float = 1.0     # DeepSeek-V2 scales the routed output
    n_group: int = 1                       # group-limited routing (DeepSeek-V2): groups of experts
    topk_group: int = 1                    # ... and how many groups a token may use
    num_shared_experts: int = 0            # always-on experts (DeepSeek-V2: N, Qwen2-MoE: 1)
    shared_expert_hidden_size: int = 0     # width of the shared expert block (0: expert_hidden_size * num_shared_experts)
    shared_expert_gate: bool = False       # Qwen2-MoE: sigmoid gate on the shared expert output
    aux_loss_coef: float = 0.01            # switch-style load-balancing loss coefficient
    seq_aux_loss: bool = False             # compute the balance loss per sequence (DeepSeek-V2/V3)
    z_loss_coef: float = 0.0               # router z-loss coefficient
    bias_update_rate: float = 0.0          # aux-loss-free balancing: per-expert bias step (sigmoid_bias router)
    capacity_factor: float = 0.0           # 0: dropless; >0: tokens over capacity are dropped in training
    eval_capacity_factor: float = 0.0      # same for evaluation
    first_k_dense: int = 0                 # the first k layers use a dense MLP instead of MoE
