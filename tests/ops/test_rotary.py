"""RoPE against rotation written with complex numbers in float64."""
from __future__ import annotations

import pytest
import torch

from linear_moe.ops import apply_rotary, rotary_cos_sin
from ops_testing import generator, randn, rel_err


def rotary_ref(x, positions, rot_dim, theta):
    """Pair dim i with dim i + rot_dim/2 as one complex number and multiply by e^{i pos theta^(-2i/d)}."""
    x = x.double()
    half = rot_dim // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / rot_dim)
    angle = positions.double().unsqueeze(-1) * freqs  # [..., T, half]
    if angle.dim() == 2:
        angle = angle.unsqueeze(0)
    z = torch.complex(x[..., :half], x[..., half:rot_dim]) * torch.polar(torch.ones_like(angle), angle).unsqueeze(2)
    return torch.cat([z.real, z.imag, x[..., rot_dim:]], dim=-1)


@pytest.mark.parametrize("rot_dim", [16, 8])
@pytest.mark.parametrize("batched_positions", [False, True])
def test_apply_rotary_matches_complex_rotation(rot_dim, batched_positions):
    g = generator()
    x = randn(g, 2, 7, 3, 16)
    positions = torch.randint(0, 5000, (2, 7) if batched_positions else (7,), generator=g)
    cos, sin = rotary_cos_sin(positions, rot_dim, theta=10000.0)
    assert cos.shape == positions.shape + (rot_dim // 2,)
    out = apply_rotary(x, cos, sin)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, rotary_ref(x, positions, rot_dim, 10000.0)) < 1e-5


def test_rotary_preserves_norm_and_relative_positions():
    g = generator()
    q, k = randn(g, 1, 1, 1, 8).double(), randn(g, 1, 1, 1, 8).double()
    def score(pq, pk):
        cq = rotary_cos_sin(torch.tensor([pq]), 8, 500.0, torch.float64)
        ck = rotary_cos_sin(torch.tensor([pk]), 8, 500.0, torch.float64)
        return (apply_rotary(q, *cq) * apply_rotary(k, *ck)).sum()
    assert torch.allclose(score(10, 3), score(107, 100))  # depends on pq - pk only
    c = rotary_cos_sin(torch.tensor([42]), 8, 500.0, torch.float64)
    assert torch.allclose(apply_rotary(q, *c).norm(), q.norm())


def test_rotary_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        rotary_cos_sin(torch.arange(4), 7)
    with pytest.raises(ValueError, match="integer"):
        rotary_cos_sin(torch.arange(4.0), 8)
    cos, sin = rotary_cos_sin(torch.arange(4), 8)
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rotary(torch.zeros(1, 5, 2, 8), cos, sin)
