"""Finite-difference gradient checks of the chunked forms in float64 (the ops compute in float64
when given float64), on tiny shapes: independent of the loop references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linear_moe.ops import delta_rule, gla
from ops_testing import generator


@pytest.mark.parametrize("kind", ["scalar", "vector_bonus"])
def test_gla_chunk_gradcheck(kind):
    g = generator()
    B, T, H, K, V = 1, 7, 1, 3, 2
    q, k, v = (torch.randn(B, T, H, d, generator=g, dtype=torch.float64) for d in (K, K, V))
    shape = (B, T, H) if kind == "scalar" else (B, T, H, K)
    log_decay = F.logsigmoid(torch.randn(*shape, generator=g, dtype=torch.float64))
    bonus = torch.randn(H, K, generator=g, dtype=torch.float64) if kind == "vector_bonus" else None
    h0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    inputs = [x.requires_grad_() for x in (q, k, v, log_decay, h0)]

    def fn(q, k, v, log_decay, h0):
        return gla(q, k, v, log_decay, bonus=bonus, initial_state=h0, output_final_state=True,
                   mode="chunk", chunk_size=4)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_chunk_gradcheck(gated):
    g = generator()
    B, T, H, K, V = 1, 7, 1, 3, 2
    q, k, v = (torch.randn(B, T, H, d, generator=g, dtype=torch.float64) for d in (K, K, V))
    k = F.normalize(k, dim=-1)
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    log_decay = F.logsigmoid(torch.randn(B, T, H, generator=g, dtype=torch.float64)) if gated else None
    h0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    inputs = [x.requires_grad_() for x in (q, k, v, beta, h0)]

    def fn(q, k, v, beta, h0):
        return delta_rule(q, k, v, beta, log_decay, initial_state=h0, output_final_state=True,
                          mode="chunk", chunk_size=4)

    assert torch.autograd.gradcheck(fn, inputs)
