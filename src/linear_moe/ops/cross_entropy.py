"""Cross-entropy of a linear head without materialising all logits: the LM head of a 150K-token
vocabulary at 32K tokens would need 20 GB of bf16 logits plus their fp32 copy. Tokens are processed in
chunks, each chunk's logits recomputed in the backward pass, so at most one chunk's logits are alive.

Vocab-parallel form (``process_group``): each rank holds a contiguous slice of the vocabulary's rows
(rank r: rows ``[r V/P, (r+1) V/P)``) and computes its slice of every token's logits; the row max,
the sum of exponentials and the target logit are all-reduced over the group (three vectors of one
number per token), so no rank ever holds a token's full logits (Megatron's vocab-parallel loss)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = F.linear(x, weight)  # not `x @ weight.t()`: autocast caches the cast of a leaf weight, never of a view
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax of a 150K vocabulary needs fp32
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 8192,
                         ignore_index: int = -100, *, process_group=None) -> torch.Tensor:
    """Mean over non-ignored tokens of ``cross_entropy(x @ weight.T, labels)``.

    With ``process_group`` (vocab parallel): ``weight`` is this rank's ``[vocab / P, hidden]`` rows,
    ``x`` and ``labels`` (global token ids) are the same on every rank, and every rank returns the
    loss over the full vocabulary. The gradient of ``x`` is this rank's part (sum it over the group,
    e.g. with an all-reduce where ``x`` entered the vocab-parallel region).

    x ``[N, hidden]``, weight ``[vocab, hidden]``, labels ``[N]`` → scalar fp32. Equal to the direct
    computation (same math in fp32 per chunk); costs one extra head matmul in the backward pass.
    """
    if x.dim() != 2 or labels.shape != x.shape[:1]:
        raise ValueError(f"linear_cross_entropy: x must be [N, hidden] and labels [N], got {tuple(x.shape)} and {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size={chunk_size} must be >= 1")
    if process_group is not None:
        return _vocab_parallel_loss(x, weight, labels, chunk_size, ignore_index, process_group)
    total = x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32))
    for start in range(0, x.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss_sum, x[sl], weight, labels[sl], ignore_index, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(x[sl], weight, labels[sl], ignore_index)
    return total / (labels != ignore_index).sum().clamp_min(1)


def _vocab_parallel_loss(x, weight, labels, chunk_size, ignore_index, group):
    total = x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32))
    for start in range(0, x.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        total = total + _VocabParallelChunk.apply(x[sl], weight, labels[sl], ignore_index, group)
    return total / (labels != ignore_index).sum().clamp_min(1)


def _local_logits(x, weight):
    logits = F.linear(x, weight)
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class _VocabParallelChunk(torch.autograd.Function):
    """Sum over one chunk's tokens of the cross-entropy, logits split by vocabulary over ``group``.
    Saves only the inputs and one log-sum-exp per token; the backward recomputes the local logits."""

    @staticmethod
    def forward(ctx, x, weight, labels, ignore_index, group):
        logits = _local_logits(x, weight)
        vocab_local = weight.shape[0]
        start = dist.get_rank(group) * vocab_local
        row_max = logits.max(-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        sum_exp = (logits - row_max[:, None]).exp().sum(-1)
        dist.all_reduce(sum_exp, group=group)
        lse = sum_exp.log() + row_max
        valid = labels != ignore_index
        local = labels - start
        mine = valid & (local >= 0) & (local < vocab_local)   # targets in this rank's rows
        target = logits.gather(1, local.clamp(0, vocab_local - 1)[:, None]).squeeze(1) * mine
        dist.all_reduce(target, group=group)
        ctx.save_for_backward(x, weight, lse, local, mine, valid)
        return ((lse - target) * valid).sum()

    @staticmethod
    def backward(ctx, grad):
        x, weight, lse, local, mine, valid = ctx.saved_tensors
        logits = _local_logits(x, weight)
        dlogits = (logits - lse[:, None]).exp()               # this rank's slice of the softmax
        rows = mine.nonzero().squeeze(1)
        dlogits[rows, local[rows]] -= 1.0
        dlogits = (dlogits * (valid[:, None] * grad)).to(x.dtype)
        grad_x = dlogits @ weight if ctx.needs_input_grad[0] else None
        grad_w = dlogits.t() @ x if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None, None
