"""Routers: pick ``top_k`` experts per token and their combine weights; router math runs in fp32.

Three flavours (``MoEConfig.router``):
  * ``softmax``      Mixtral / Qwen2-MoE: softmax over experts, top-k, optional renormalisation.
  * ``deepseek``     DeepSeek-V2: softmax scores, optional group-limited top-k (groups ranked by
                     their best expert).
  * ``sigmoid_bias`` DeepSeek-V3: sigmoid scores; a per-expert bias enters the *selection* only
                     (groups ranked by the sum of their two best biased scores); the weights are
                     the unbiased scores. The bias is nudged toward uniform load by ``update_bias``.

The balance losses live here too because they only need router outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig


@dataclass
class RouterOutput:
    """What a router decides for ``N`` tokens over ``E`` experts.

    topk_idx    [N, k] int64  chosen experts, best first
    topk_weight [N, k] fp32   combine weights (renormalised if asked, times routed_scaling_factor)
    probs       [N, E] fp32   per-expert probabilities the balance loss uses (sum to one per token)
    logits      [N, E] fp32   raw router logits (for the z-loss)
    """

    topk_idx: torch.Tensor
    topk_weight: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor


def expert_counts(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many routing choices picked each expert: topk_idx [...] -> [E] int64.

    ``scatter_add_`` rather than ``bincount``: CUDA's bincount reads the max on the host (a sync).
    """
    flat = topk_idx.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def _group_mask(select_scores: torch.Tensor, n_group: int, topk_group: int, per_group_best: int) -> torch.Tensor:
    """[N, E] bool: True for experts inside the ``topk_group`` best groups of each token.

    A group's score is the sum of its ``per_group_best`` highest ``select_scores``.
    """
    n, e = select_scores.shape
    grouped = select_scores.view(n, n_group, e // n_group)
    k = min(per_group_best, e // n_group)
    group_scores = grouped.topk(k, dim=-1).values.sum(-1)                      # [N, G]
    keep_groups = group_scores.topk(topk_group, dim=-1).indices                # [N, topk_group]
    mask = torch.zeros(n, n_group, dtype=torch.bool, device=select_scores.device)
    mask.scatter_(1, keep_groups, True)
    return mask.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e)


def route(logits: torch.Tensor, cfg: MoEConfig, expert_bias: torch.Tensor | None = None) -> RouterOutput:
    """Route tokens given fp32 ``logits [N, E]`` (see the module docstring for the flavours)."""
    logits = logits.float()
    k = cfg.top_k
    if cfg.router == "sigmoid_bias":
        scores = torch.sigmoid(logits)
        select = scores if expert_bias is None else scores + expert_bias.float()
        probs = scores / scores.sum(-1, keepdim=True)
        per_group_best = 2
    elif cfg.router in ("softmax", "deepseek"):
        scores = torch.softmax(logits, dim=-1)
        select, probs, per_group_best = scores, scores, 1
    else:
        raise ValueError(f"moe.router={cfg.router!r} is not a known router; choose one of: softmax, deepseek, sigmoid_bias")
    if cfg.n_group > 1:
        # Experts outside the kept groups can never be chosen: -inf loses every comparison.
        select = select.masked_fill(~_group_mask(select, cfg.n_group, cfg.topk_group, per_group_best), float("-inf"))
    topk_idx = select.topk(k, dim=-1).indices
    weight = scores.gather(1, topk_idx)
    if cfg.norm_topk_prob:
        weight = weight / weight.sum(-1, keepdim=True).clamp_min(1e-20)
    if cfg.routed_scaling_factor != 1.0:  # a multiply by one is still a kernel launch
        weight = weight * cfg.routed_scaling_factor
    return RouterOutput(topk_idx, weight, probs, logits)


class Router(nn.Module):
    """A bias-free linear gate ``weight [E, hidden]`` (HF's ``gate.weight``) plus the routing rule.

    ``forward(x [N, hidden]) -> RouterOutput``. For ``sigmoid_bias`` it holds the persistent
    buffer ``expert_bias [E]`` and counts the load of training forwards in ``load_since_update``.
    """

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))
        if cfg.router == "sigmoid_bias":
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
            self.register_buffer("load_since_update", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)
        else:
            self.expert_bias = None
            self.load_since_update = None
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        if std is None:
            nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's default
        else:
            nn.init.normal_(self.weight, std=std)
        if self.expert_bias is not None:
            self.expert_bias.zero_()
            self.load_since_update.zero_()

    def forward(self, x: torch.Tensor) -> RouterOutput:
        # fp32 even under autocast (else F.linear would cast both to bf16 and route() back: three copies
        # per layer, and bf16 logits decide the experts)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        out = route(logits, self.cfg, self.expert_bias)
        if self.load_since_update is not None and self.training:
            with torch.no_grad():
                self.load_since_update += expert_counts(out.topk_idx, self.cfg.num_experts)
        return out

    @torch.no_grad()
    def update_bias(self, group: dist.ProcessGroup | None = None) -> None:
        """Aux-loss-free balancing step (DeepSeek-V3): raise the bias of under-loaded experts and lower
        that of over-loaded ones by ``bias_update_rate``, from the load counted since the last call.

        Call after ``optimizer.step()`` (``update_moe_biases(model)`` does it for every layer). Pass the
        group spanning all ranks that see different tokens (data x expert parallel) so every rank
        applies the same step; ``None`` uses the local counts only.
        """
        if self.expert_bias is None or self.cfg.bias_update_rate == 0:
            return
        load = self.load_since_update
        if group is not None:
            dist.all_reduce(load, group=group)
        # No load yet: mean - load is zero everywhere, so the step is zero (and needs no host check).
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()


def load_balancing_loss(probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, seq_len: int | None = None,
                        counts: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style balance loss ``E * sum_e f_e * P_e`` (1 at perfect balance).

    ``f_e`` is the fraction of the ``N * k`` routing choices that picked expert ``e`` (before any
    capacity dropping) and ``P_e`` the mean router probability of ``e``. With ``seq_len`` the tokens
    ``[N = B * seq_len]`` are split into sequences, the loss is taken per sequence and averaged
    (DeepSeek's sequence-wise loss). ``probs [N, E]``, ``topk_idx [N, k]`` -> scalar. ``counts [E]``:
    the choices per expert when the caller has them already (the dropless dispatcher's), not counted
    again; only without ``seq_len``.
    """
    n, k = topk_idx.shape
    if counts is not None and seq_len not in (None, n):
        raise ValueError(f"load_balancing_loss: counts [E] are for the whole batch; got seq_len={seq_len} < {n} tokens")
    seq_len = seq_len or n
    b = n // seq_len
    if counts is not None:
        counts = counts.to(probs.dtype).unsqueeze(0)
    else:
        counts = torch.zeros(b, num_experts, device=probs.device, dtype=probs.dtype)
        counts.scatter_add_(1, topk_idx.reshape(b, seq_len * k),
                            torch.ones(b, seq_len * k, device=probs.device, dtype=probs.dtype))
    f = counts / (seq_len * k)
    p = probs.reshape(b, seq_len, num_experts).mean(1)
    return num_experts * (f * p).sum(-1).mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of ``logsumexp(logits)^2``; ``logits [N, E]`` -> scalar."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
