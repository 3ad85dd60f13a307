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
from torch.distributed.tensor import DTensor

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


def _bf16_parts(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    """fp32 ``t`` as ``n`` bf16 terms whose fp32 sum is ``t`` to about ``2**(-8 n)`` (3 terms: fp32's 24 bits)."""
    parts, rest = [], t.float()
    for i in range(n):
        part = rest.bfloat16()
        parts.append(part)
        if i + 1 < n:
            rest = rest - part.float()
    return parts


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bf16 ``a @ b`` accumulated and returned in fp32. Each bf16 product is exact in fp32, so this is an
    fp32 GEMM of those values. CUDA: one tensor-core GEMM (``out_dtype``); elsewhere through fp32 copies."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class _SplitRouterLogits(torch.autograd.Function):
    """fp32 ``x @ weight.T`` for bf16 ``x`` and an fp32 (or bf16) ``weight`` on bf16 tensor cores, to fp32 accuracy.

    The weight is split into three bf16 terms (hi + mid + lo = its 24 bits) stacked as one ``[3E, C]`` operand:
    one GEMM gives the three partial logits in fp32, summed smallest first. Backward splits the fp32 logit
    gradient the same way: ``dweight`` from one ``[3E, N] @ [N, C]`` GEMM (x is exact in bf16), ``dx`` (bf16, as
    x) from the terms above bf16's own rounding (hi*hi, hi*mid, mid*hi) in one GEMM with a ``3E`` inner size.
    On the H100 the fp32 (FFMA) router GEMMs and the casts around them took ~0.24 ms of the A0.3B-2B MoE
    layer's fwd+bwd at 16K tokens; these bf16 GEMMs are a fraction of that.
    """

    @staticmethod
    def forward(ctx, x, weight):
        e = weight.shape[0]
        w_parts = _bf16_parts(weight, 3 if weight.dtype != torch.bfloat16 else 1)
        partial = _mm_fp32(x, torch.cat(w_parts).t())                                     # [N, parts * E]
        logits = partial[:, -e:]
        for i in range(len(w_parts) - 2, -1, -1):  # smallest term first
            logits = logits + partial[:, i * e:(i + 1) * e]
        ctx.save_for_backward(x, *w_parts)
        ctx.weight_dtype = weight.dtype
        return logits

    @staticmethod
    def backward(ctx, grad):
        x, *w_parts = ctx.saved_tensors
        e = grad.shape[1]
        g_hi, g_mid, g_lo = _bf16_parts(grad, 3)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # hi*hi + mid*hi (+ hi*mid when the weight has a mid term)
            w_hi, w_mid = w_parts[0], w_parts[1:2]
            dx = torch.cat([g_hi, g_mid, g_hi][:2 + len(w_mid)], 1) @ torch.cat([w_hi, w_hi, *w_mid])  # bf16, fp32-accumulated
        if ctx.needs_input_grad[1]:
            partial = _mm_fp32(torch.cat([g_lo, g_mid, g_hi], 1).t(), x)                 # [3E, C]
            dw = (partial[:e] + partial[e:2 * e] + partial[2 * e:]).to(ctx.weight_dtype)
        return dx, dw


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 router logits ``x @ weight.T`` (x [N, C], weight [E, C]). bf16 activations on CUDA take the split-bf16
    tensor-core form (fp32 accuracy, see ``_SplitRouterLogits``); everything else an fp32 GEMM."""
    if x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype in (torch.float32, torch.bfloat16) \
            and not torch.compiler.is_compiling() and not isinstance(x, DTensor) and not isinstance(weight, DTensor):
        return _SplitRouterLogits.apply(x, weight)  # (DTensors: mm with out_dtype has no sharding rule to rely on)
    return F.linear(x.float(), weight.float())


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
            logits = router_logits(x, self.weight)
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
