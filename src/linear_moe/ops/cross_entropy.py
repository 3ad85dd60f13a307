"""Cross-entropy of a linear head without materialising all logits: the LM head of a 150K-token
vocabulary at 32K tokens would need 20 GB of bf16 logits plus their fp32 copy. Tokens are processed in
chunks, so at most one chunk's logits are alive.

Fused form (the default): the forward pass computes each chunk's logits once and, while they are alive,
the gradients too (``softmax - onehot`` times the head weight and the inputs, Liger-Kernel's idea); the
backward pass only scales the two stored gradients by the incoming one. Nothing of the logits is kept and
the head matmul is not recomputed. On CUDA the per-chunk softmax and its gradient are one Triton kernel
(``ce_kernel.py``: two reads and one in-place write of the logits instead of five passes, three in fp32);
``LINEAR_MOE_CE_KERNEL=0`` keeps the PyTorch form. Checkpointed form (``fused=False``, the reference): each chunk under
``torch.utils.checkpoint``, its logits recomputed in the backward pass.

Vocab-parallel form (``process_group``): each rank holds a contiguous slice of the vocabulary's rows
(rank r: rows ``[r V/P, (r+1) V/P)``) and computes its slice of every token's logits; the row max,
the sum of exponentials and the target logit are all-reduced over the group (three vectors of one
number per token), so no rank ever holds a token's full logits (Megatron's vocab-parallel loss)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from linear_moe.ops.backends import optional_module


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 8192,
                         ignore_index: int = -100, *, process_group=None, fused: bool = True) -> torch.Tensor:
    """Mean over non-ignored tokens of ``cross_entropy(x @ weight.T, labels)``.

    x ``[N, hidden]``, weight ``[vocab, hidden]``, labels ``[N]`` → scalar fp32 (fp64 for fp64 inputs); 0
    when every label is ``ignore_index``. Under autocast the head matmuls run in the autocast dtype (as
    ``F.linear`` would), the softmax in fp32.

    ``fused=True``: the gradients are computed in the forward pass (only where grad mode is on and the
    input requires grad) and kept until the backward pass: ``x``'s ``[N, hidden]`` in ``x``'s dtype and the
    weight's ``[vocab, hidden]`` in fp32 (vocab * hidden * 4 bytes: 600 MB at 152K x 1024). Three head
    matmuls per chunk, one fewer than ``fused=False``; backing up twice through the loss
    (``retain_graph=True``) is not supported (the stored gradients are scaled in place).

    With ``process_group`` (vocab parallel): ``weight`` is this rank's ``[vocab / P, hidden]`` rows,
    ``x`` and ``labels`` (global token ids) are the same on every rank, and every rank returns the
    loss over the full vocabulary. The gradient of ``x`` is this rank's part (sum it over the group,
    e.g. with an all-reduce where ``x`` entered the vocab-parallel region). Always checkpointed.
    """
    if x.dim() != 2 or labels.shape != x.shape[:1]:
        raise ValueError(f"linear_cross_entropy: x must be [N, hidden] and labels [N], got {tuple(x.shape)} and {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size={chunk_size} must be >= 1")
    if process_group is not None:
        return _vocab_parallel_loss(x, weight, labels, chunk_size, ignore_index, process_group)
    if not fused:
        return _checkpointed_loss(x, weight, labels, chunk_size, ignore_index)
    need_dx = torch.is_grad_enabled() and x.requires_grad
    need_dw = torch.is_grad_enabled() and weight.requires_grad
    if need_dx or need_dw:
        return _FusedLinearCrossEntropy.apply(x, weight, labels, chunk_size, ignore_index, need_dx, need_dw)
    return _fused_loss_and_grads(x, weight, labels, chunk_size, ignore_index, False, False)[0]


# ---- fused: loss and gradients in one pass over the chunks -----------------------------------------------

class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, chunk_size, ignore_index, need_dx, need_dw):
        loss, dx, dw = _fused_loss_and_grads(x, weight, labels, chunk_size, ignore_index, need_dx, need_dw)
        ctx.save_for_backward(dx, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        dx, dw = ctx.saved_tensors
        # in place: the stored gradients are freed after this pass anyway; a second pass (retain_graph) would
        # find them modified and autograd raises. `grad` is a device tensor: no host sync.
        grad_x = dx.mul_(grad) if dx is not None else None
        grad_w = dw.mul_(grad).to(ctx.weight_dtype) if dw is not None else None
        return grad_x, grad_w, None, None, None, None, None


def _fused_loss_and_grads(x, weight, labels, chunk_size, ignore_index, need_dx, need_dw):
    """``(mean loss, d loss / dx or None, d loss / d weight (fp32) or None)``, chunk by chunk."""
    device = x.device.type
    if torch.is_autocast_enabled(device):  # cast as autocast would for F.linear (fp64 is never cast)
        low = torch.get_autocast_dtype(device)
        x_mm, w_mm = (t if t.dtype == torch.float64 else t.to(low) for t in (x, weight))
    else:
        x_mm, w_mm = x, weight
    acc_dtype = torch.promote_types(x_mm.dtype, torch.float32)
    valid = labels != ignore_index
    num_valid = valid.sum().clamp_min(1)              # stays on the device
    scale = valid.to(acc_dtype) / num_valid           # d mean / d token loss: 0 for ignored tokens
    safe_labels = labels.masked_fill(~valid, 0)       # any in-range index; those rows are scaled by 0
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
    dw = None
    total = torch.zeros((), dtype=acc_dtype, device=x.device)
    with torch.autocast(device, enabled=False):       # the dtypes are chosen above, explicitly
        for start in range(0, x.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            loss_sum, dw = _fused_chunk(x_mm[sl], w_mm, safe_labels[sl], valid[sl], scale[sl],
                                        dx[sl] if need_dx else None, dw, need_dw, acc_dtype)
            total = total + loss_sum
    return total / num_valid, dx, dw


def _fused_chunk(x, weight, labels, valid, scale, dx_out, dw, need_dw, acc_dtype):
    """One chunk: returns (sum of its token losses, dw plus its part); writes its rows of dx into
    ``dx_out``. A function of its own so that the chunk's ``[chunk, vocab]`` tensors die on return,
    before the next chunk's are made. Holds at most the compute-dtype logits and one fp32 copy."""
    logits = F.linear(x, weight)                                  # [chunk, vocab], compute dtype
    want_grad = dx_out is not None or need_dw
    if _use_kernel(logits, acc_dtype):  # one Triton program per row: two reads, one in-place write
        rows = _kernel().cross_entropy_rows_(logits, labels, scale, want_grad)
        loss_sum, dlogits = torch.where(valid, rows, 0).sum(), logits
    else:
        loss_sum, dlogits = _softmax_grad_torch(logits, labels, valid, scale, acc_dtype, want_grad)
    if not want_grad:
        return loss_sum, dw
    if dx_out is not None:
        dx_out.copy_(dlogits @ weight)
    if need_dw:
        part = dlogits.t() @ x
        dw = part.to(acc_dtype) if dw is None else dw.add_(part)  # accumulated across chunks in fp32
    return loss_sum, dw


def _softmax_grad_torch(logits, labels, valid, scale, acc_dtype, want_grad):
    """(sum of the valid rows' losses, ``scale * (softmax - onehot)`` in the logits' dtype, written over them,
    or None): the PyTorch form of ``ce_kernel.cross_entropy_rows_`` (CPU, fp64, torch.compile)."""
    target = logits.gather(1, labels[:, None]).squeeze(1).to(acc_dtype)
    row_max = logits.amax(-1).to(acc_dtype)
    # exp(logits - max) in fp32 (in place when the logits are fp32 already: no second copy)
    shifted = logits.sub_(row_max[:, None]) if logits.dtype == acc_dtype else logits - row_max[:, None]
    exp = shifted.exp_()
    sum_exp = exp.sum(-1)
    lse = sum_exp.log() + row_max
    loss_sum = torch.where(valid, lse - target, 0).sum()
    if not want_grad:
        return loss_sum, None
    # d token loss / d logits = softmax - onehot = (exp - sum_exp * onehot) / sum_exp; the mean's 1/num_valid
    # and the 1/sum_exp go into one factor per row, the result is cast to the compute dtype in the same pass
    exp.scatter_add_(1, labels[:, None], -sum_exp[:, None])
    return loss_sum, torch.mul(exp, (scale / sum_exp)[:, None], out=logits)


def _kernel():
    """The Triton module (``ce_kernel.py``), or None when Triton does not import."""
    return optional_module("linear_moe.ops.ce_kernel")


def _use_kernel(logits: torch.Tensor, acc_dtype: torch.dtype) -> bool:
    """The Triton kernel runs for CUDA logits in fp32 arithmetic (not fp64), outside torch.compile, unless
    ``LINEAR_MOE_CE_KERNEL=0``. On by default since its H100 run: correct in fp32 and bf16
    (tests/ops/test_ce_kernel.py), and at 8K tokens x 152K vocabulary 13.5 ms and 4.4 GiB peak against the
    PyTorch form's 27.6 ms and 8.2 GiB (benchmarks/loss_bench.py, 2026-11-25)."""
    setting = os.environ.get("LINEAR_MOE_CE_KERNEL", "1")
    if setting not in ("0", "1"):
        raise ValueError(f"LINEAR_MOE_CE_KERNEL={setting!r} is not understood; allowed: '1' (the Triton loss "
                         "kernel on CUDA, the default) or '0' (the PyTorch form)")
    return (setting == "1" and logits.is_cuda and acc_dtype == torch.float32
            and not torch.compiler.is_compiling() and _kernel() is not None)


# ---- checkpointed (the reference): logits recomputed in the backward pass ---------------------------------

def _logits_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = F.linear(x, weight)  # not `x @ weight.t()`: autocast caches the cast of a leaf weight, never of a view
    # the softmax of a 150K vocabulary needs fp32
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _mean_over_chunks(x, labels, chunk_size, ignore_index, chunk_sum) -> torch.Tensor:
    """Mean over the non-ignored tokens of the per-token losses that ``chunk_sum(slice)`` sums chunk by chunk."""
    total = x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32))
    for start in range(0, x.shape[0], chunk_size):
        total = total + chunk_sum(slice(start, start + chunk_size))
    return total / (labels != ignore_index).sum().clamp_min(1)


def _chunk_loss_sum(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return F.cross_entropy(_logits_fp32(x, weight), labels, ignore_index=ignore_index, reduction="sum")


def _checkpointed_loss(x, weight, labels, chunk_size, ignore_index):
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)

    def chunk_sum(sl):
        if grad:
            return checkpoint(_chunk_loss_sum, x[sl], weight, labels[sl], ignore_index, use_reentrant=False)
        return _chunk_loss_sum(x[sl], weight, labels[sl], ignore_index)

    return _mean_over_chunks(x, labels, chunk_size, ignore_index, chunk_sum)


# ---- vocab parallel --------------------------------------------------------------------------------------

def _vocab_parallel_loss(x, weight, labels, chunk_size, ignore_index, group):
    return _mean_over_chunks(x, labels, chunk_size, ignore_index,
                             lambda sl: _VocabParallelChunk.apply(x[sl], weight, labels[sl], ignore_index, group))


class _VocabParallelChunk(torch.autograd.Function):
    """Sum over one chunk's tokens of the cross-entropy, logits split by vocabulary over ``group``.
    Saves only the inputs and one log-sum-exp per token; the backward recomputes the local logits."""

    @staticmethod
    def forward(ctx, x, weight, labels, ignore_index, group):
        logits = _logits_fp32(x, weight)
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
        logits = _logits_fp32(x, weight)
        dlogits = (logits - lse[:, None]).exp()               # this rank's slice of the softmax
        rows = mine.nonzero().squeeze(1)
        dlogits[rows, local[rows]] -= 1.0
        dlogits = (dlogits * (valid[:, None] * grad)).to(x.dtype)
        grad_x = dlogits @ weight if ctx.needs_input_grad[0] else None
        grad_w = dlogits.t() @ x if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None, None
