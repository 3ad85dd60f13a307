"""Obviously-correct per-token versions of routing and the MoE layer, for tests (slow: Python loops).

They read a layer's parameters directly, so autograd gives gradients comparable to the fast path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import MoEConfig


def reference_route(logits: torch.Tensor, cfg: MoEConfig, expert_bias: torch.Tensor | None = None):
    """Route one token: ``logits [E]`` -> (chosen experts as a list, best first; weights [k] tensor)."""
    e = logits.shape[0]
    scores = torch.sigmoid(logits) if cfg.router == "sigmoid_bias" else torch.softmax(logits, dim=0)
    select = [float(s) for s in scores.detach()]
    if cfg.router == "sigmoid_bias" and expert_bias is not None:
        select = [s + float(b) for s, b in zip(select, expert_bias)]
    allowed = list(range(e))
    if cfg.n_group > 1:
        size = e // cfg.n_group
        groups = [select[g * size:(g + 1) * size] for g in range(cfg.n_group)]
        best = 2 if cfg.router == "sigmoid_bias" else 1
        group_score = [sum(sorted(vals, reverse=True)[:best]) for vals in groups]
        kept = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[:cfg.topk_group]
        allowed = [i for i in allowed if i // size in kept]
    chosen = sorted(allowed, key=lambda i: -select[i])[:cfg.top_k]
    weight = scores[chosen]
    if cfg.norm_topk_prob:
        weight = weight / weight.sum()
    return chosen, weight * cfg.routed_scaling_factor


def reference_expert(layer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Routed expert ``e`` of ``layer`` (a full, unsharded MoELayer) on one token ``x [C]``."""
    ex = layer.experts
    return (F.silu(ex.gate_proj[e] @ x) * (ex.up_proj[e] @ x)) @ ex.down_proj[e].T


def reference_moe_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)[0]`` token by token: x [batch, time, C] or [tokens, C] -> same shape.

    Capacity: tokens are visited in flattened order and each expert accepts until it is full.
    """
    cfg: MoEConfig = layer.cfg
    flat = x.reshape(-1, x.shape[-1])
    factor = cfg.capacity_factor if layer.training else cfg.eval_capacity_factor
    capacity = math.ceil(factor * flat.shape[0] * cfg.top_k / cfg.num_experts) if factor else None
    taken = [0] * cfg.num_experts
    rows = []
    for t in range(flat.shape[0]):
        xt = flat[t]
        logits = layer.router.weight.float() @ xt.float()
        chosen, weight = reference_route(logits, cfg, layer.router.expert_bias)
        out = torch.zeros_like(xt)
        for j, e in enumerate(chosen):
            if capacity is not None and taken[e] >= capacity:
                continue
            taken[e] += 1
            out = out + weight[j].to(xt.dtype) * reference_expert(layer, e, xt)
        if layer.shared_expert is not None:
            shared = layer.shared_expert(xt)
            if layer.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(layer.shared_expert_gate(xt))
            out = out + shared
        rows.append(out)
    return torch.stack(rows).view_as(x)
