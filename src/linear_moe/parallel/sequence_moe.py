"""The MoE balance loss under sequence parallelism: taken over the whole sequence, not each rank's slice.

The Switch balance loss ``E * sum_e f_e * P_e`` is a product of two means over the tokens (``f_e``: share
of routing choices that picked expert ``e``; ``P_e``: mean router probability of ``e``). With the time
axis split over ``sp`` ranks, the mean over ranks of the per-rank products is not the product of the
means, so each MoE layer here all-reduces its per-expert choice counts and probability sums over the sp
group (one all-reduce of ``[sequences, 2 E]``) before the product. Every sp rank then holds the loss
of the whole sequence; the all-reduce's backward sums the gradients of every rank's copy, so with the
gradients averaged over the sp ranks (FSDP) the routers get the single-process gradient.

The z-loss is a plain mean over tokens: the mean over ranks is already the whole sequence's.

Mixture-of-Memories mixers (``mom_*``) route tokens to memories with the same kind of balance loss
(``mixer.aux_loss``, over all tokens of the batch): it is made whole-sequence the same way.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from .blocks import blocks
from .tp_comm import all_reduce_sum


def sequence_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, sequences: int,
                          group, sp: int) -> torch.Tensor:
    """The balance loss of ``sequences`` sequences whose tokens are split over the ``sp`` ranks of
    ``group`` (equal shares). ``probs [N, E]``, ``topk_idx [N, k]`` this rank's tokens, sequence-major
    (``N = sequences * local length``); ``sequences=1``: one pool of all tokens. Returns a scalar,
    the same on every rank."""
    n, k = topk_idx.shape
    local_len = n // sequences
    counts = probs.new_zeros(sequences, num_experts)
    counts.scatter_add_(1, topk_idx.reshape(sequences, local_len * k),
                        probs.new_ones(sequences, local_len * k))
    sums = all_reduce_sum(torch.cat([counts, probs.reshape(sequences, local_len, num_experts).sum(1)], -1), group)
    tokens = local_len * sp
    f, p = sums[:, :num_experts] / (tokens * k), sums[:, num_experts:] / tokens
    return num_experts * (f * p).sum(-1).mean()


def apply_sequence_balance(model: nn.Module, handler) -> None:
    """Make every MoE layer of ``model`` report the balance loss of the whole sequence over the LASP-2
    ``handler``'s group (while ``handler.enabled``; otherwise the layer's own, local one)."""
    for block in blocks(model):
        if getattr(block, "is_moe", False):
            _wrap(block.ffn, handler)
        if getattr(block, "mixer_name", "").startswith("mom_"):
            _wrap_memories(block.mixer, handler)


def _after_forward(module: nn.Module, after) -> None:
    """Wrap ``module.forward``: its output and its router's output of that call (recorded as the router runs)
    go to ``after(args, out, routed)``, whose result is returned instead."""
    seen = {}
    route = module.router.forward

    @functools.wraps(route)
    def router_forward(x):
        seen["routed"] = out = route(x)
        return out

    module.router.forward = router_forward
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        return after(args, out, seen.pop("routed", None))

    module.forward = forward


def _wrap(moe: nn.Module, handler) -> None:
    def after(args, out, r):
        y, aux = out
        if not handler.enabled:
            return y, aux
        x, cfg = args[0], moe.cfg
        sequences = x.shape[0] if (cfg.seq_aux_loss and x.dim() == 3) else 1
        balance = sequence_balance_loss(r.probs, r.topk_idx, cfg.num_experts, sequences, handler.group, handler.size)
        scaled = cfg.aux_loss_coef * balance
        moe.last_stats["balance_loss"] = balance.detach()
        return y, dataclasses.replace(aux, loss=scaled + aux.z_loss_scaled, balance_loss=balance,
                                      balance_loss_scaled=scaled)

    _after_forward(moe, after)


def _wrap_memories(mixer: nn.Module, handler) -> None:
    """MoM: recompute ``mixer.aux_loss`` from its router's logits over the whole sequence."""
    def after(args, out, logits):
        if handler.enabled and mixer.training and logits is not None and mixer.aux_loss is not None:
            probs = logits.float().softmax(-1).flatten(0, -2)  # [N, M], as the mixer's own router
            chosen = probs.topk(mixer.topk, dim=-1).indices
            mixer.aux_loss = mixer.aux_loss_coef * sequence_balance_loss(
                probs, chosen, probs.shape[-1], 1, handler.group, handler.size)
        return out

    _after_forward(mixer, after)
