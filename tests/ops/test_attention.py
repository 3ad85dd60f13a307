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


def _fake_varlen(calls, params):
    """A stand-in for torch.nn.attention.varlen.varlen_attn with the documented semantics, computed by the float64
    reference: [T, H, D] rows, int32 boundaries, window_size (left, right) with (-1, 0) causal and (W, 0) a window
    of W keys before the query, enable_gqa; or the older is_causal form."""
    def fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kw):
        assert set(kw) <= params and cu_seq_q is cu_seq_k and cu_seq_q.dtype == torch.int32
        lengths = (cu_seq_q[1:] - cu_seq_q[:-1]).tolist()
        assert max_q == max_k == max(lengths)
        if "window_size" in kw:
            left, right = kw["window_size"]
            assert right == 0
            window = 0 if left == -1 else left + 1
        else:
            assert kw["is_causal"] is True
            window = 0
        if key.shape[1] != query.shape[1]:
            assert kw.get("enable_gqa") is True
        calls.append(kw)
        out = reference.attention_ref(query[None], key[None], value[None], cu_seqlens=cu_seq_q, sliding_window=window,
                                      scale=kw.get("scale"))
        return out[0].to(query.dtype)
    return fn


@pytest.mark.parametrize("api", ["window_size", "is_causal"])
@pytest.mark.parametrize("packed,window,kv_heads", [(True, 0, 2), (True, 3, 1), (False, 4, 4), (True, 0, 4)])
def test_packed_and_windowed_attention_go_to_varlen_flash(monkeypatch, api, packed, window, kv_heads):
    """On CUDA, packed or windowed attention runs on torch's varlen flash attention, not on a [T, T] mask: the window,
    GQA, the scale and the boundaries are handed over right, batch rows become sequences of their own, and a torch
    whose varlen_attn lacks window_size (or scale) keeps the mask path for windows (scales)."""
    from linear_moe.ops import attention
    calls = []
    params = {"window_size", "enable_gqa", "scale"} if api == "window_size" else {"is_causal"}
    monkeypatch.setattr(attention, "_varlen_api", lambda: (_fake_varlen(calls, params), frozenset(params)))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # the route is CUDA's
    g = generator()
    B, T = (1, 14) if packed else (2, 9)
    cu = torch.tensor([0, 3, 10, 14], dtype=torch.int32) if packed else None
    q, k, v = randn(g, B, T, 4, 8).bfloat16(), randn(g, B, T, kv_heads, 8).bfloat16(), randn(g, B, T, kv_heads, 8).bfloat16()
    scale = 0.3 if api == "window_size" else None
    out = causal_attention(q, k, v, cu_seqlens=cu, sliding_window=window, scale=scale)
    ref = reference.attention_ref(q, k, v, cu_seqlens=cu, sliding_window=window, scale=scale)
    assert rel_err(out, ref) < 2e-2 and out.dtype == torch.bfloat16 and out.shape == (B, T, 4, 8)
    assert len(calls) == (0 if api == "is_causal" and window else 1)
    out = causal_attention(q, k, v, cu_seqlens=cu, sliding_window=window, scale=0.5)  # a scale the old API lacks
    assert len(calls) == (2 if api == "window_size" else (0 if window else 1))
    assert rel_err(out, reference.attention_ref(q, k, v, cu_seqlens=cu, sliding_window=window, scale=0.5)) < 2e-2
    monkeypatch.setenv("LINEAR_MOE_KERNEL_BACKEND", "torch")  # the escape hatch: plain SDPA with a mask
    before = len(calls)
    assert rel_err(causal_attention(q, k, v, cu_seqlens=cu, sliding_window=window), reference.attention_ref(
        q, k, v, cu_seqlens=cu, sliding_window=window)) < 2e-2 and len(calls) == before
