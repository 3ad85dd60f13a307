"""Based and ReBased against their kernels written directly in float64 (no feature maps, no ops):
o_t = Σ_{s≤t} κ(q_t, k_s) v_s / Σ_{s≤t} κ(q_t, k_s)."""
from __future__ import annotations

import pytest
import torch

from linear_moe.layers import AttentionConfig, MixerConfig, build_mixer


def jittered(module: torch.nn.Module, g: torch.Generator) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module


def taylor_kernel(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Based: 2nd-order Taylor expansion of exp(q·k/√d)."""
    z = (q * k).sum(-1) / q.shape[-1] ** 0.5
    return 1 + z + z * z / 2


def rebased_kernel(gamma: torch.Tensor, beta: torch.Tensor):
    def norm(x):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * gamma + beta

    return lambda q, k: ((norm(q) * norm(k)).sum(-1)) ** 2


def reference(layer, x: torch.Tensor, kernel) -> torch.Tensor:
    x = x.double()
    W = {n: p.detach().double() for n, p in layer.named_parameters()}
    B, T, _ = x.shape
    H, d, V = layer.num_heads, layer.feature_dim, layer.head_v_dim
    q = (x @ W["q_proj.weight"].T).view(B, T, H, d)
    k = (x @ W["k_proj.weight"].T).view(B, T, H, d)
    v = (x @ W["v_proj.weight"].T).view(B, T, H, V)
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    for t in range(T):
        weights = kernel(q[:, t:t + 1], k[:, :t + 1])  # [B, t+1, H]
        o[:, t] = (weights[..., None] * v[:, :t + 1]).sum(1) / (weights.sum(1)[..., None] + 1e-6)
    return o.reshape(B, T, H * V) @ W["o_proj.weight"].T


@pytest.mark.parametrize("name", ["based", "rebased"])
@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_matches_kernel_definition(name, mode):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    cfg = MixerConfig(head_dim=4, mode=mode, chunk_size=4)
    layer = jittered(build_mixer(name, 12, cfg, AttentionConfig(num_heads=3), 0, 1), g)
    x = torch.randn(2, 11, 12, generator=g)
    with torch.no_grad():
        y, _ = layer(x)
    if name == "based":
        kernel = taylor_kernel
    else:
        fm = layer.feature_map
        kernel = rebased_kernel(fm.gamma.detach().double(), fm.beta.detach().double())
    ref = reference(layer, x, kernel)
    if name == "based":  # κ ≥ 1/2: the normalised output is well conditioned
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
    else:  # κ = (q̃·k̃)² can be ~0 for a lone first token, where fp32 rounding of κ is amplified
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-4
        torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-3)


def test_default_feature_dim_is_the_papers():
    layer = build_mixer("based", 32, MixerConfig(), AttentionConfig(num_heads=2), 0, 1)
    assert layer.feature_dim == 16 and layer.feature_map.out_dim == 1 + 16 + 16 * 17 // 2
