"""Based and ReBased against their kernels written directly in float64 (no feature maps, no ops):
o_t = Σ_{s≤t} κ(q_t, k_s) v_s / Σ_{s≤t} κ(q_t, k_s)."""
from __future__ import annotations

import pytest
import torch

from layer_testing import float64_params, generator, jittered
from linear_moe.layers import AttentionConfig, MixerConfig, build_mixer


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
    W = float64_params(layer)
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
    g = generator()
    cfg = MixerConfig(head_dim=4, mode=mode, chunk_size=4)
    # ReBased's normaliser Σ (q̃·k̃)² can come close to 0 while its features are O(1), so fp32 rounding
    # is amplified on rare draws (~1e-4); it is checked in float64 (the ops run fp64 as fp64). Based's
    # kernel is ≥ 1/2, well conditioned, and checked in fp32.
    dtype = torch.float64 if name == "rebased" else torch.float32
    layer = jittered(build_mixer(name, 12, cfg, AttentionConfig(num_heads=3), 0, 1), g).to(dtype)
    x = torch.randn(2, 11, 12, generator=g, dtype=dtype)
    with torch.no_grad():
        y, _ = layer(x)
    if name == "based":
        kernel = taylor_kernel
    else:
        fm = layer.feature_map
        kernel = rebased_kernel(fm.gamma.detach().double(), fm.beta.detach().double())
    torch.testing.assert_close(y.double(), reference(layer, x, kernel), rtol=1e-4, atol=1e-5)


def test_default_feature_dim_is_the_papers():
    layer = build_mixer("based", 32, MixerConfig(), AttentionConfig(num_heads=2), 0, 1)
    assert layer.feature_dim == 16 and layer.feature_map.out_dim == 1 + 16 + 16 * 17 // 2


def window_softmax_reference(attn, x: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding-window causal softmax attention with half-split RoPE, float64, token by token."""
    x = x.double()
    P = float64_params(attn)
    B, T, _ = x.shape
    H, D = attn.num_heads, attn.head_dim
    inv_freq = attn.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)

    def rope(z, pos):  # z [..., D]
        c, s = torch.cos(pos * inv_freq), torch.sin(pos * inv_freq)
        z1, z2 = z[..., :D // 2], z[..., D // 2:]
        return torch.cat([z1 * c - z2 * s, z2 * c + z1 * s], -1)

    q = (x @ P["q_proj.weight"].T).view(B, T, H, D)
    k = (x @ P["k_proj.weight"].T).view(B, T, H, D)
    v = (x @ P["v_proj.weight"].T).view(B, T, H, D)
    o = torch.zeros(B, T, H, D, dtype=torch.float64)
    for t in range(T):
        lo = max(0, t - window + 1)
        qt = rope(q[:, t], t)
        ks = torch.stack([rope(k[:, s], s) for s in range(lo, t + 1)], 1)  # [B, n, H, D]
        w = torch.softmax((qt[:, None] * ks).sum(-1) / D ** 0.5, dim=1)
        o[:, t] = (w[..., None] * v[:, lo:t + 1]).sum(1)
    return o.reshape(B, T, H * D) @ P["o_proj.weight"].T


def test_based_window_branch_adds_sliding_window_softmax_attention():
    g = generator()
    cfg = MixerConfig(head_dim=4, based_window=3, chunk_size=4)
    layer = jittered(build_mixer("based", 12, cfg, AttentionConfig(num_heads=3), 0, 1), g)
    x = torch.randn(2, 8, 12, generator=g)
    with torch.no_grad():
        y, _ = layer(x)
        state, steps = None, []
        for t in range(8):
            y_t, state = layer(x[:, t:t + 1], state)
            steps.append(y_t)
    ref = reference(layer, x, taylor_kernel) + window_softmax_reference(layer.window_attention, x, 3)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), y, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="based_window=-1"):
        build_mixer("based", 12, MixerConfig(based_window=-1), AttentionConfig(num_heads=3), 0, 1)


def test_quadratic_features_are_the_pair_products_with_matmul_gradients(monkeypatch):
    """Each unordered pair x_i x_j once (off-diagonal times √2), in x's dtype even under autocast; fwd+bwd
    without a host sync and without an index gather (whose backward is PyTorch's sort-based index_put: 14.4 of
    a Based layer's 26.7 ms of kernels at 32K tokens on the H100)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from host_sync import no_host_sync
    from linear_moe.layers.feature_maps import quadratic_features

    x = torch.randn(3, 4, 5, generator=generator(), dtype=torch.float64, requires_grad=True)
    i, j = torch.triu_indices(5, 5)
    scale = torch.full(i.shape, 2.0, dtype=torch.float64).sqrt().masked_fill(i == j, 1.0)
    want = x[..., i] * x[..., j] * scale
    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    quadratic_features(x)  # the selection matrix is built (once) outside the checks
    with no_host_sync(monkeypatch), Ops():
        got = quadratic_features(x)
        (grad,) = torch.autograd.grad(got, x, torch.ones_like(got))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (want_grad,) = torch.autograd.grad(want, x, torch.ones_like(want))
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    assert not [op for op in seen if op.startswith("index")], seen
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert quadratic_features(x.float()).dtype == torch.float32  # ReBased's fp32 LayerNorm output stays fp32
