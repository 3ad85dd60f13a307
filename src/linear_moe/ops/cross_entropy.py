"""Cross-entropy of a linear head without materialising all logits: the LM head of a 150K-token
vocabulary at 32K tokens would need 20 GB of bf16 logits plus their fp32 copy. Tokens are processed in
chunks, each chunk's logits recomputed in the backward pass, so at most one chunk's logits are alive."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = x @ weight.t()
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax of a 150K vocabulary needs fp32
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 8192,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean over non-ignored tokens of ``cross_entropy(x @ weight.T, labels)``.

    x ``[N, hidden]``, weight ``[vocab, hidden]``, labels ``[N]`` → scalar fp32. Equal to the direct
    computation (same math in fp32 per chunk); costs one extra head matmul in the backward pass.
    """
    if x.dim() != 2 or labels.shape != x.shape[:1]:
        raise ValueError(f"linear_cross_entropy: x must be [N, hidden] and labels [N], got {tuple(x.shape)} and {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size={chunk_size} must be >= 1")
    total = x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32))
    for start in range(0, x.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss_sum, x[sl], weight, labels[sl], ignore_index, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(x[sl], weight, labels[sl], ignore_index)
    return total / (labels != ignore_index).sum().clamp_min(1)
