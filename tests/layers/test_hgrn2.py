"""HGRN2 against a float64 step-by-step implementation of its recurrence (lower-bounded forget gate,
input gate 1 - f, state expansion, RMSNorm), written here without the ops."""
from __future__ import annotations

import pytest
import torch

from layer_testing import causal_conv, float64_params, generator, jittered
from linear_moe.layers import AttentionConfig, MixerConfig, build_mixer


def hgrn2_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """x ``[B, T, C]`` → y ``[B, T, C]`` in float64, one token at a time with an explicit state ``[B, H, K, V]``."""
    P = float64_params(layer)
    H, K, V = layer.num_heads, layer.head_k_dim, layer.head_v_dim
    B, T, _ = x.shape
    q, f, i = (x.double() @ P[f"{n}_proj.weight"].T for n in "qfi")
    if layer.use_short_conv:
        q, f, i = (causal_conv(z, P[f"{n}_conv.weight"], silu=False) for z, n in zip((q, f, i), "qfi"))
    lower = torch.sigmoid(P["lower_bound_logit"]) if "lower_bound_logit" in P else torch.zeros(H * K)
    forget = (lower + (1 - lower) * torch.sigmoid(f)).view(B, T, H, K)
    query = (q * torch.sigmoid(q)).view(B, T, H, K)
    inp = i.view(B, T, H, V)
    S = torch.zeros(B, H, K, V, dtype=torch.float64)
    out = []
    for t in range(T):
        f_t = forget[:, t, :, :, None]
        S = f_t * S + (1 - f_t) * inp[:, t, :, None, :]  # input gate 1 - f_t, outer product with the input
        o = (query[:, t, :, :, None] * S).sum(-2).reshape(B, H * V)
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * P["norm.weight"]
        out.append(o @ P["o_proj.weight"].T)
    return torch.stack(out, 1)


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
@pytest.mark.parametrize("layer_idx,short_conv", [(0, False), (2, True)])
def test_hgrn2_matches_recurrence(mode, layer_idx, short_conv):
    g = generator()
    cfg = MixerConfig(head_dim=4, mode=mode, chunk_size=4, use_short_conv=short_conv)
    layer = jittered(build_mixer("hgrn2", 12, cfg, AttentionConfig(num_heads=3), layer_idx, 4), g)
    x = torch.randn(2, 9, 12, generator=g)
    with torch.no_grad():
        y, _ = layer(x)
    torch.testing.assert_close(y.double(), hgrn2_reference(layer, x), rtol=1e-4, atol=1e-5)


def test_lower_bound_grows_with_depth_and_is_absent_in_the_first_layer():
    bounds = []
    for idx in range(4):
        layer = build_mixer("hgrn2", 12, MixerConfig(head_dim=4), AttentionConfig(num_heads=3), idx, 4)
        lb = layer.lower_bound_logit
        bounds.append(0.0 if lb is None else torch.sigmoid(lb).mean().item())
    assert bounds[0] == 0.0
    assert bounds == sorted(bounds) and abs(bounds[2] - 0.5) < 1e-6
