"""GSA layer against a step-by-step float64 implementation of the paper's equations (two passes over
slot memories sharing one forget gate, softmax over slots in between), written here without the ops."""
from __future__ import annotations

import pytest
import torch

from layer_testing import causal_conv, float64_params, generator, jittered
from linear_moe.layers import AttentionConfig, MixerConfig, build_mixer


def gsa_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """x ``[B, T, C]`` → y ``[B, T, C]`` in float64, one token at a time."""
    x = x.double()
    W = float64_params(layer)
    H, K, V, M = layer.num_heads, layer.head_k_dim, layer.head_v_dim, layer.num_slots
    silu = lambda t: t * torch.sigmoid(t)  # noqa: E731
    out = []
    for b in range(x.shape[0]):
        q, k, v = x[b] @ W["q_proj.weight"].T, x[b] @ W["k_proj.weight"].T, x[b] @ W["v_proj.weight"].T
        if layer.use_short_conv:
            q, k, v = (causal_conv(z, W[f"{n}_conv.weight"]) for z, n in ((q, "q"), (k, "k"), (v, "v")))
        q, k, v = silu(q).view(-1, H, K), silu(k).view(-1, H, K), silu(v).view(-1, H, V)
        f = (x[b] @ W["f_proj.weight"].T).view(-1, H, M)
        alpha = torch.sigmoid(f) ** (1.0 / layer.gate_logit_normalizer)  # forget gate in (0, 1)
        slot_k = torch.zeros(H, K, M, dtype=torch.float64)
        slot_v = torch.zeros(H, M, V, dtype=torch.float64)
        o = torch.zeros(x.shape[1], H, V, dtype=torch.float64)
        for t in range(x.shape[1]):
            for h in range(H):
                a, s = alpha[t, h], 1 - alpha[t, h]
                slot_k[h] = slot_k[h] * a[None, :] + torch.outer(k[t, h], s)
                slot_v[h] = slot_v[h] * a[:, None] + torch.outer(s, v[t, h])
                read = torch.softmax(q[t, h] @ slot_k[h], dim=0)  # scale 1, softmax over the M slots
                o[t, h] = read @ slot_v[h]
        o = silu(o.reshape(x.shape[1], H * V))
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * W["norm.weight"]
        out.append(o @ W["o_proj.weight"].T)
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
@pytest.mark.parametrize("short_conv", [True, False])
def test_gsa_matches_paper_equations(mode, short_conv):
    g = generator()
    cfg = MixerConfig(num_slots=3, head_dim=4, use_short_conv=short_conv, mode=mode, chunk_size=4,
                      gate_logit_normalizer=4.0)
    layer = jittered(build_mixer("gsa", 12, cfg, AttentionConfig(num_heads=2), 0, 1), g)
    x = torch.randn(2, 9, 12, generator=g)
    with torch.no_grad():
        y, _ = layer(x)
    ref = gsa_reference(layer, x)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
