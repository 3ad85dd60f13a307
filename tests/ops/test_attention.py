"""`causal_attention` against a float64 softmax loop: GQA, packed sequences, sliding windows."""
from __future__ import annotations

import pytest
import torch

from linear_moe.ops import causal_attention
from ops_testing import generator, randn, reference, rel_err


@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [0, 3])
def test_causal_attention_matches_reference(heads, kv_heads, window):
    g = generator()
    q, k, v = randn(g, 2, 9, heads, 8), randn(g, 2, 9, kv_heads, 8), randn(g, 2, 9, kv_heads, 6)
    out = causal_attention(q, k, v, sliding_window=window)
    assert out.shape == (2, 9, heads, 6)
    assert rel_err(out, reference.attention_ref(q, k, v, sliding_window=window)) < 1e-5


@pytest.mark.parametrize("window", [0, 4])
def test_causal_attention_varlen_with_gradients(window):
    g = generator()
    cu = torch.tensor([0, 3, 10, 14])
    q, k, v = (randn(g, 1, 14, h, 8).requires_grad_() for h in (4, 2, 2))
    out = causal_attention(q, k, v, cu_seqlens=cu, sliding_window=window, scale=0.3)
    ref = reference.attention_ref(q, k, v, cu_seqlens=cu, sliding_window=window, scale=0.3)
    assert rel_err(out, ref) < 1e-5
    w = randn(g, *out.shape).double()
    grads = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.zeros(1, 4, 3, 8)), "multiple of key/value heads"),
    (dict(k=torch.zeros(1, 4, 2, 4)), "k must be"),
    (dict(sliding_window=-1), "sliding_window"),
    (dict(q=torch.zeros(2, 4, 2, 8), k=torch.zeros(2, 4, 2, 8), v=torch.zeros(2, 4, 2, 8),
          cu_seqlens=torch.tensor([0, 4])), "batch size 1"),
    (dict(cu_seqlens=torch.tensor([0, 3])), "end at time=4"),
])
def test_causal_attention_rejects_bad_input(bad, match):
    args = dict(q=torch.zeros(1, 4, 2, 8), k=torch.zeros(1, 4, 2, 8), v=torch.zeros(1, 4, 2, 8))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        causal_attention(**args)
