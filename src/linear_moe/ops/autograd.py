"""Small autograd helpers shared by the layers above."""
from __future__ import annotations

import torch


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """Identity whose backward makes the incoming gradient contiguous. ``y.sum().backward()`` hands back an
    expanded, stride-0 gradient, which ``_grouped_mm``'s backward rejects and gloo refuses to send (a
    pipeline stage's input gradients go into buffers shaped like the first microbatch's)."""
    return _ContiguousGrad.apply(x)
