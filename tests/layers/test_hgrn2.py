"""HGRN2 against a float64 step-by-step implementation of its recurrence (lower-bounded forget gate,
input gate 1 - f, state expansion, RMSNorm), written here without the ops."""
from __future__ import annotations

import pytest
import torch

from layer_testing import causal_conv, float64_params, generator, jittered
from linear_moe.layers import AttentionConfig, MixerConfig, build_mixer


def hgrn2_reference(layer, x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    P = float64_params(layer)
    H, K, V = layer.num_heads, layer.head_k_dim, layer.head_v_dim
    B, T, C = x.shape
    out = torch.zeros(B, T, C, dtype=torch.float64)
    for b in range(B):
        q, f, i = (x[b] @ P[f"{n}_proj.weight"].T for n in ("q", "f", "i"))
        if layer.use_short_conv:
            q, f, i = (causal_conv(z, P[f"{n}_conv.weight"], silu=False) for z, n in ((q, "q"), (f, "f"), (i, "i")))
        lower = torch.sigmoid(P["lower_bound_logit"]) if "lower_bound_logit" in P else torch.zeros(H * K)
        S = torch.zeros(H, K, V, dtype=torch.float64)
        for t in range(T):
            forget = (lower + (1 - lower) * torch.sigmoid(f[t])).view(H, K)
            query = (q[t] * torch.sigmoid(q[t])).view(H, K)
            inp = i[t].view(H, V)
            o = torch.zeros(H, V, dtype=torch.float64)
            for h in range(H):
                S[h] = forget[h][:, None] * S[h] + torch.outer(1 - forget[h], inp[h])
                o[h] = query[h] @ S[h]
            o = o.reshape(-1)
            o = o / torch.sqrt(o.pow(2).mean() + 1e-5) * P["norm.weight"]
            out[b, t] = P["o_proj.weight"] @ o
    return out


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
