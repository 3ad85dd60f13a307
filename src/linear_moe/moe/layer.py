"""The MoE channel mixer: router -> sort by expert (-> all-to-all) -> grouped experts -> weighted combine,
plus optional shared experts. ``MoELayer(hidden, cfg)(x) -> (y, aux)``.

Single rank, the path is gathers and grouped GEMMs only: no atomics, no host sync when dropless (the
expert counts stay on the device, as do the statistics in ``last_stats``), and the routing weight folded
into the experts' SwiGLU so the combine is a plain per-token sum (``permute.py``, ``experts.py``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import MoEConfig
from .dispatch import expert_parallel_apply, sort_by_expert
from .experts import GroupedExperts
from .mlp import SwiGLUMLP
from .permute import combine, dispatch, inverse_order, permute
from .router import Router, expert_counts, load_balancing_loss, router_z_loss


@dataclass
class MoEAux:
    """Side outputs of one MoE forward.

    loss                 scalar, ``aux_loss_coef * balance_loss + z_loss_coef * z_loss``: add it to the LM loss
    balance_loss, z_loss scalars, unscaled, for reporting (with autograd; z_loss only when z_loss_coef > 0)
    balance_loss_scaled, z_loss_scaled   their contributions to ``loss``
    tokens_per_expert    [E] float, detached: routing choices per expert from this rank's tokens (before dropping)
    dropped_fraction     scalar, detached: share of routing choices dropped by the capacity limit
    """

    loss: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    balance_loss_scaled: torch.Tensor
    z_loss_scaled: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_fraction: torch.Tensor


class MoELayer(nn.Module):
    """Mixture of SwiGLU experts with top-k routing.

    ``forward(x [batch, time, hidden] or [tokens, hidden]) -> (y same shape, MoEAux)``; the last stats are
    also kept detached in ``self.last_stats``. A ``[tokens, hidden]`` input counts as one sequence for
    ``seq_aux_loss``.

    Expert parallelism: ``enable_expert_parallel(group)`` keeps only this rank's slice of the experts
    and exchanges tokens with all-to-all; each rank still routes and combines its own tokens. What the
    layer expects from whoever applies data parallelism (W = dp * ep ranks, loss = mean over ranks):
      * router, shared expert (replicated, gradient from local tokens only): average over all W ranks,
        the ep group included;
      * ``experts.*`` (this rank's slice): the gradient already holds the sum over the ep group's tokens,
        so sum over the expert-data-parallel group (the W / ep ranks holding the same slice) and divide
        by W (= average over that group, then divide by ep).
    """

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        cfg.validate()
        self.cfg, self.hidden_size = cfg, hidden_size
        self.router = Router(hidden_size, cfg)
        self.experts = GroupedExperts(cfg.num_experts, hidden_size, cfg.expert_hidden_size, cfg.expert_backend,
                                      cfg.expert_recompute)
        shared = cfg.shared_hidden_size()
        self.shared_expert = SwiGLUMLP(hidden_size, shared) if shared else None
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if cfg.shared_expert_gate else None
        self.ep_group = None
        self.ep_rank, self.ep_size = 0, 1
        self.last_stats: dict[str, torch.Tensor] = {}

    def enable_expert_parallel(self, group: dist.ProcessGroup | None) -> "MoELayer":
        """Shard the routed experts over ``group`` (None: the default group); all ranks must hold the same
        full weights when this is called. A group of size 1 changes nothing."""
        world = dist.get_world_size(group)
        self.cfg.validate(ep_size=world)
        if self.ep_size != 1:
            raise ValueError("expert parallelism is already enabled on this layer")
        if world == 1:
            return self
        self.ep_group, self.ep_rank, self.ep_size = group, dist.get_rank(group), world
        self.experts = self.experts.shard(self.ep_rank, world)
        return self

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for ``num_tokens`` local tokens, or None when dropless."""
        factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        if factor == 0:
            return None
        return math.ceil(factor * num_tokens * self.cfg.top_k / self.cfg.num_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        if x.dim() not in (2, 3) or x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoELayer expects x of shape [batch, time, {self.hidden_size}] or [tokens, {self.hidden_size}], got {tuple(x.shape)}")
        seq_len = x.shape[1] if x.dim() == 3 else x.shape[0]
        flat = x.reshape(-1, self.hidden_size)
        cfg, k = self.cfg, self.cfg.top_k

        r = self.router(flat)
        n_slots = r.topk_idx.numel()
        capacity = self.capacity(flat.shape[0])
        order, counts, dropped = sort_by_expert(r.topk_idx, cfg.num_experts, capacity)
        slot_to_row = inverse_order(order, n_slots)          # [N * k]: sorted row of each slot, n if dropped
        token = order // k                                     # [n]: token of each sorted row
        if torch.is_autocast_enabled(flat.device.type):  # cast the N token rows, not the N * k copies
            flat = flat.to(torch.get_autocast_dtype(flat.device.type))
        if self.ep_size == 1:
            # the experts gather the rows themselves (moe.expert_recompute: and redo it in backward instead of
            # keeping them), and the routing weight rides into their SwiGLU, so the combine is a plain sum
            row_weight = permute(r.topk_weight.reshape(-1), order, slot_to_row)
            y = self.experts(flat, counts, row_weight, token=token, slot_to_row=slot_to_row.view(-1, k),
                             combine_tokens=True)
        else:
            # the experts' forward is wrapped by parallel/expert.py (gradient scaling): it sees rows only
            x_sorted = dispatch(flat, token, slot_to_row.view(-1, k))
            y_sorted = expert_parallel_apply(x_sorted, counts, self.ep_group, self.experts)
            y = combine(y_sorted, token, slot_to_row.view(-1, k), r.topk_weight)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(flat))
            y = y + shared

        # counted before dropping; dropless: the sort's counts are exactly that
        tokens_per_expert = (counts if capacity is None else expert_counts(r.topk_idx, cfg.num_experts)).float()
        balance = load_balancing_loss(r.probs, r.topk_idx, cfg.num_experts, seq_len if cfg.seq_aux_loss else None,
                                      counts=None if cfg.seq_aux_loss else tokens_per_expert)
        balance_scaled = cfg.aux_loss_coef * balance
        if cfg.z_loss_coef:
            z = router_z_loss(r.logits)
            z_scaled = cfg.z_loss_coef * z
            loss = balance_scaled + z_scaled
        else:  # reported only: no graph, no backward ops, and no 0 * inf
            with torch.no_grad():
                z = router_z_loss(r.logits)
            z_scaled, loss = torch.zeros_like(z), balance_scaled
        dropped_fraction = dropped.float() / n_slots if capacity is not None else dropped.float()  # dropless: 0
        aux = MoEAux(loss, balance, z, balance_scaled, z_scaled, tokens_per_expert, dropped_fraction)
        self.last_stats = {"tokens_per_expert": tokens_per_expert, "dropped_fraction": dropped_fraction,
                           "balance_loss": balance.detach(), "z_loss": z.detach()}
        return y.view_as(x), aux

    def update_bias(self, group: dist.ProcessGroup | None = None) -> None:
        """Aux-loss-free balancing step for a ``sigmoid_bias`` router (no-op otherwise); see ``Router.update_bias``."""
        self.router.update_bias(group)

    def reset_parameters(self, std: float | None = None) -> None:
        """(Re)initialise every weight: Normal(0, std), or nn.Linear-style defaults when ``std`` is None;
        zero the routing bias. For a layer built on the meta device, after ``to_empty``."""
        self.router.reset_parameters(std)
        self.experts.reset_parameters(std)
        if self.shared_expert is not None:
            self.shared_expert.reset_parameters(std)
        if self.shared_expert_gate is not None:
            if std is None:
                self.shared_expert_gate.reset_parameters()
            else:
                nn.init.normal_(self.shared_expert_gate.weight, std=std)


def build_channel_mixer(kind: str, hidden_size: int, cfg: MoEConfig, intermediate_size: int) -> nn.Module:
    """``kind`` ``E``: ``MoELayer(hidden_size, cfg)`` (returns ``(y, aux)``); ``D``: ``SwiGLUMLP(hidden_size,
    intermediate_size)`` (returns ``y``)."""
    if kind == "E":
        return MoELayer(hidden_size, cfg)
    if kind == "D":
        return SwiGLUMLP(hidden_size, intermediate_size)
    raise ValueError(f"channel mixer kind {kind!r} is not one of: E (MoE), D (dense SwiGLU)")


def update_moe_biases(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Call after ``optimizer.step()``: applies the aux-loss-free bias step in every ``MoELayer`` of ``model``."""
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.update_bias(group)
