"""Configuration of the channel mixer: Mixture-of-Experts (or dense) options."""
from __future__ import annotations

from dataclasses import dataclass

ROUTERS = ("softmax", "deepseek", "sigmoid_bias")
EXPERT_BACKENDS = ("auto", "grouped_mm", "loop", "fused_gather")


@dataclass
class MoEConfig:
    """Mixture-of-Experts options shared by every layer whose channel mixer is an MoE.

    Names follow Hugging Face / Megatron conventions where they exist.

    Routers (``router``):
      * ``softmax``: softmax over all experts, then top-k (Mixtral with ``norm_topk_prob=True``,
        Qwen2-MoE with ``norm_topk_prob=False``).
      * ``deepseek``: DeepSeek-V2: softmax scores; with ``n_group > 1`` a token first keeps the
        ``topk_group`` groups whose best expert scores highest, then takes top-k inside them.
      * ``sigmoid_bias``: DeepSeek-V3: sigmoid scores; a per-expert bias (not a parameter) is added
        for *selection only* and nudged by ``bias_update_rate`` toward uniform load when the trainer
        calls ``update_moe_biases(model)`` after the optimizer step. Groups rank by the sum of their
        two best biased scores.
    Every router multiplies the final top-k weights by ``routed_scaling_factor``.

    Capacity: with ``capacity_factor > 0`` (training) / ``eval_capacity_factor > 0`` (evaluation)
    each expert takes at most ``ceil(factor * tokens * top_k / num_experts)`` of the tokens this
    rank routes; earlier tokens (flattened batch-major, then time order) win; dropped assignments
    add zero (the block's residual carries the token through).
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
    expert_backend: str = "auto"           # auto (torch._grouped_mm where it runs, else loop) | grouped_mm | loop
    #                                        | fused_gather (CUDA: Triton GEMMs that read routed rows by index)
    expert_recompute: bool = False         # False: backward reads the routed rows and SwiGLU output kept from forward;
    #                                        True re-gathers and recomputes them: top_k * (hidden + expert width) fewer
    #                                        saved values per token, ~4% slower layer (H100, A0.3B-2B)

    def shared_hidden_size(self) -> int:
        """Width of the single SwiGLU that holds all shared experts (0: no shared expert)."""
        if self.num_shared_experts <= 0:
            return 0
        return self.shared_expert_hidden_size or self.expert_hidden_size * self.num_shared_experts

    def validate(self, ep_size: int = 1) -> "MoEConfig":
        """Raise ValueError naming the first bad field and what is allowed; return self when fine."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.num_experts >= 1, f"moe.num_experts={self.num_experts} must be >= 1")
        need(1 <= self.top_k <= self.num_experts,
             f"moe.top_k={self.top_k} must be between 1 and moe.num_experts={self.num_experts}")
        need(self.expert_hidden_size >= 1, f"moe.expert_hidden_size={self.expert_hidden_size} must be >= 1")
        need(self.router in ROUTERS, f"moe.router={self.router!r} is not a known router; choose one of: {', '.join(ROUTERS)}")
        need(self.expert_backend in EXPERT_BACKENDS,
             f"moe.expert_backend={self.expert_backend!r} is not one of: {', '.join(EXPERT_BACKENDS)}")
        need(self.n_group >= 1, f"moe.n_group={self.n_group} must be >= 1")
        need(self.num_experts % self.n_group == 0,
             f"moe.n_group={self.n_group} must divide moe.num_experts={self.num_experts}")
        need(1 <= self.topk_group <= self.n_group,
             f"moe.topk_group={self.topk_group} must be between 1 and moe.n_group={self.n_group}")
        if self.n_group > 1:
            need(self.router in ("deepseek", "sigmoid_bias"),
                 f"moe.n_group={self.n_group} (group-limited routing) needs moe.router deepseek or sigmoid_bias, not {self.router!r}")
            reachable = self.topk_group * (self.num_experts // self.n_group)
            need(self.top_k <= reachable,
                 f"moe.top_k={self.top_k} exceeds the {reachable} experts in moe.topk_group={self.topk_group} groups")
        need(self.capacity_factor >= 0, f"moe.capacity_factor={self.capacity_factor} must be >= 0 (0 = dropless)")
        need(self.eval_capacity_factor >= 0, f"moe.eval_capacity_factor={self.eval_capacity_factor} must be >= 0 (0 = dropless)")
        need(self.num_shared_experts >= 0, f"moe.num_shared_experts={self.num_shared_experts} must be >= 0")
        need(self.shared_expert_hidden_size >= 0, f"moe.shared_expert_hidden_size={self.shared_expert_hidden_size} must be >= 0")
        need(not self.shared_expert_gate or self.num_shared_experts > 0,
             "moe.shared_expert_gate=True needs moe.num_shared_experts >= 1")
        need(self.routed_scaling_factor > 0, f"moe.routed_scaling_factor={self.routed_scaling_factor} must be > 0")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            need(getattr(self, name) >= 0, f"moe.{name}={getattr(self, name)} must be >= 0")
        need(self.first_k_dense >= 0, f"moe.first_k_dense={self.first_k_dense} must be >= 0")
        need(ep_size >= 1 and self.num_experts % ep_size == 0,
             f"moe.num_experts={self.num_experts} is not divisible by the expert-parallel size {ep_size}")
        return self
