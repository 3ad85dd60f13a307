"""Triton kernel for the fused linear cross-entropy's per-chunk softmax (``cross_entropy.py``): one program per
token row reads the row's logits twice and writes its gradient once, in place.

The PyTorch form of the same step makes five passes over a ``[chunk, vocab]`` tensor, three of them in fp32
(the shifted copy, the in-place exp, the row sum, the scaled cast back): at 8K tokens and a 152K vocabulary
that is ~30 GB of memory traffic, ~11 ms of an H100's 144 ms training step. This kernel's two reads and one
write of 16-bit logits are ~7.5 GB.

Pass 1 keeps a running maximum and sum of exponentials per lane (rescaled when the maximum grows) and folds
the lanes at the end: the row's log-sum-exp. Pass 2 writes ``scale * (softmax - onehot(label))`` over the
logits. Imported lazily (CUDA tensors, or tests under ``TRITON_INTERPRET=1`` on CPU), so the package imports
without Triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, labels_ptr, scale_ptr, loss_ptr, stride, V: tl.constexpr,
                               WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    cols = tl.arange(0, BLOCK)
    # a finite start: a lane that only ever sees masked (-inf) entries keeps exp(m - m_new) = 1, not nan
    # (V is a compile-time constant: one vocabulary per model, and the interpreter's loops want it so)
    m = tl.full([BLOCK], -1e30, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for i in range(tl.cdiv(V, BLOCK)):
        c = i * BLOCK + cols
        x = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    row_max = tl.max(m, 0)
    lse = row_max + tl.log(tl.sum(s * tl.exp(m - row_max), 0))
    label = tl.load(labels_ptr + row)
    target = tl.load(base + label).to(tl.float32)  # read before pass 2 overwrites it
    tl.store(loss_ptr + row, lse - target)
    if WRITE_GRAD:
        scale = tl.load(scale_ptr + row).to(tl.float32)
        for i in range(tl.cdiv(V, BLOCK)):
            c = i * BLOCK + cols
            mask = c < V
            x = tl.load(base + c, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            p = tl.where(c == label, p - 1.0, p)
            tl.store(base + c, (p * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows_(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                        write_grad: bool) -> torch.Tensor:
    """Per-row ``logsumexp(logits) - logits[label]`` (fp32 ``[N]``) of ``logits`` ``[N, V]`` (16-bit or fp32,
    rows contiguous); with ``write_grad`` the logits are overwritten by ``scale[:, None] * (softmax - onehot)``
    in their own dtype. ``labels`` ``[N]`` must be valid indices (a row to be ignored gets any index and
    scale 0)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a 2-D tensor with contiguous rows, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}")
    N, V = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return loss
    block = min(4096, triton.next_power_of_2(V))
    _cross_entropy_rows_kernel[(N,)](logits, labels.contiguous(), scale.float().contiguous(), loss,
                                     logits.stride(0), V, WRITE_GRAD=write_grad, BLOCK=block,
                                     num_warps=8 if block >= 2048 else 4)
    return loss
