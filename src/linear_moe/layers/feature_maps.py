"""Feature maps φ of linear attention: ``softmax(q·k)`` is replaced by ``φ(q)·φ(k)``.

Each map is an ``nn.Module`` applied per head: ``[..., head_dim]`` → ``[..., out_dim]``, with
``out_dim`` an attribute so a mixer can size its state. Build one by name with :func:`feature_map`:

=============  ============================================  =====================================
name           φ(x)                                          out_dim
=============  ============================================  =====================================
identity       x                                             d
elu            elu(x) + 1  (Katharopoulos et al. 2020)       d
relu           relu(x)                                       d
swish / silu   x · sigmoid(x)                                d
taylor         [1, x / d^¼, (x ⊗ x) / (√2 · √d)]  (Based)    1 + d + d(d+1)/2
rebased        (γ ⊙ LN(x) + β)^⊗2, learnable  (ReBased)      d(d+1)/2
hedgehog       softmax([xW, -xW])  (Hedgehog), learnable     2d
t2r            relu(xW + b)  (T2R), learnable                d
=============  ============================================  =====================================

The quadratic maps store each unordered pair ``x_i x_j`` once (upper triangle, off-diagonal terms
times √2), so ``⟨x^⊗2, y^⊗2⟩ = (x·y)²`` exactly at about half the width of the full outer product.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import upcast


_PAIR_SELECTIONS: dict = {}


def _pair_selection(d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[d*d, d(d+1)/2]``: column ``p`` of pair ``(i <= j)`` holds 1 (i == j) or √2 at row ``i*d + j``. Built once
    per (d, device, dtype): building it per call cost host work and a device sync (the diagonal's mask)."""
    key = (d, device, dtype)
    sel = _PAIR_SELECTIONS.get(key)
    if sel is None:
        i, j = torch.triu_indices(d, d)
        sel = torch.zeros(d * d, i.numel(), dtype=torch.float64)
        sel[i * d + j, torch.arange(i.numel())] = torch.where(i == j, 1.0, torch.tensor(2.0, dtype=torch.float64).sqrt())
        sel = _PAIR_SELECTIONS[key] = sel.to(device=device, dtype=dtype)
    return sel


def quadratic_features(x: torch.Tensor) -> torch.Tensor:
    """``[..., d]`` → ``[..., d(d+1)/2]`` with ``⟨quadratic_features(x), quadratic_features(y)⟩ = (x·y)²``.

    The outer product ``x xᵀ`` times a constant selection matrix, in x's dtype (autocast off): its backward is a
    matmul too, where gathering the pairs by index (``x[..., i] * x[..., j]``) made PyTorch's sort-based
    indexing backward: 14.4 of a Based layer's 26.7 ms of kernels at 32K tokens on the H100 (2026-11-25)."""
    d = x.shape[-1]
    with torch.autocast(x.device.type, enabled=False):
        outer = (x[..., :, None] * x[..., None, :]).flatten(-2)
        return outer @ _pair_selection(d, x.device, x.dtype)


class _Elementwise(nn.Module):
    def __init__(self, head_dim: int, fn):
        super().__init__()
        self.out_dim = head_dim
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class TaylorFeatureMap(nn.Module):
    """Based's 2nd-order Taylor map: ``φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d) ≈ exp(q·k/√d)``."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.out_dim = 1 + head_dim + head_dim * (head_dim + 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.head_dim
        ones = torch.ones_like(x[..., :1])
        return torch.cat([ones, x / d ** 0.25, quadratic_features(x) / (math.sqrt(2.0) * d ** 0.5)], dim=-1)


class ReBasedFeatureMap(nn.Module):
    """ReBased's learnable quadratic kernel: ``φ(x) = (γ ⊙ LN(x) + β)^⊗2`` so ``φ(q)·φ(k) = (q̃·k̃)²``.

    Parameters ``gamma, beta [head_dim]`` (LayerNorm without its own affine, γ=1, β=0 at init).
    """

    def __init__(self, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(head_dim))
        self.beta = nn.Parameter(torch.zeros(head_dim))
        self.out_dim = head_dim * (head_dim + 1) // 2

    def reset_parameters(self) -> None:
        nn.init.ones_(self.gamma)
        nn.init.zeros_(self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(upcast(x), x.shape[-1:], eps=self.eps) * upcast(self.gamma) + upcast(self.beta)
        return quadratic_features(y).to(x.dtype)


class HedgehogFeatureMap(nn.Module):
    """Hedgehog: ``softmax([xW, -xW])`` over the 2d features, ``W [d, d]`` learnable (identity at init)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim))
        self.out_dim = 2 * head_dim

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.weight.to(x.dtype)
        return upcast(torch.cat([z, -z], dim=-1)).softmax(-1).to(x.dtype)


class T2RFeatureMap(nn.Module):
    """T2R: ``relu(xW + b)``, ``W [d, d]`` (identity at init) and ``b [d]`` learnable."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim))
        self.bias = nn.Parameter(torch.zeros(head_dim))
        self.out_dim = head_dim

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.weight.shape[0]))
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x @ self.weight.to(x.dtype) + self.bias.to(x.dtype))


FEATURE_MAPS = {
    "identity": lambda d: _Elementwise(d, lambda x: x),
    "elu": lambda d: _Elementwise(d, lambda x: F.elu(x) + 1.0),
    "relu": lambda d: _Elementwise(d, F.relu),
    "swish": lambda d: _Elementwise(d, F.silu),
    "silu": lambda d: _Elementwise(d, F.silu),
    "taylor": TaylorFeatureMap,
    "rebased": ReBasedFeatureMap,
    "hedgehog": HedgehogFeatureMap,
    "t2r": T2RFeatureMap,
}


def feature_map(name: str, head_dim: int, mixer: str = "") -> nn.Module:
    """Build the feature map ``name`` for heads of width ``head_dim``; the module has ``.out_dim``.

    Raises ``ValueError`` naming the bad name and listing the known ones.
    """
    if name not in FEATURE_MAPS:
        prefix = f"{mixer}: " if mixer else ""
        raise ValueError(f"{prefix}feature_map={name!r} is not supported; choose one of: {', '.join(FEATURE_MAPS)}")
    if head_dim < 1:
        raise ValueError(f"feature_map {name!r}: head_dim={head_dim} must be >= 1")
    return FEATURE_MAPS[name](head_dim)
