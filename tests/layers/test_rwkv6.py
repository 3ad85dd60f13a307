"""RWKV-6 time mixing against a float64 step-by-step implementation of the Finch equations (token
shift, ddlerp, LoRA decay, bonus u, per-head GroupNorm, SiLU gate), written here without the ops."""
from __future__ import annotations

import pytest
import torch

from layer_testing import float64_params, generator, jittered
from linear_moe.layers import AttentionConfig, MixerConfig, build_mixer
from linear_moe.layers.rwkv6 import GROUP_NORM_EPS, token_shift


def rwkv6_reference(layer, x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    P = float64_params(layer)
    H, K, V = layer.num_heads, layer.head_k_dim, layer.head_v_dim
    B, T, C = x.shape
    out = torch.zeros(B, T, C, dtype=torch.float64)
    for b in range(B):
        S = torch.zeros(H, K, V, dtype=torch.float64)
        prev = torch.zeros(C, dtype=torch.float64)
        for t in range(T):
            xt = x[b, t]
            dx = prev - xt
            prev = xt
            base = torch.tanh((xt + dx * P["mix_x"]) @ P["mix_w1"]).view(5, -1)
            mix = [P["mix_bias"][i] + base[i] @ P["mix_w2"][i] for i in range(5)]
            xw, xk, xv, xr, xg = (xt + dx * m for m in mix)
            r = (P["r_proj.weight"] @ xr).view(H, K)
            k = (P["k_proj.weight"] @ xk).view(H, K)
            v = (P["v_proj.weight"] @ xv).view(H, V)
            gate = P["g_proj.weight"] @ xg
            gate = gate * torch.sigmoid(gate)
            w = P["decay_base"] + torch.tanh(xw @ P["decay_w1"]) @ P["decay_w2"]
            decay = torch.exp(-torch.exp(w)).view(H, K)
            o = torch.zeros(H, V, dtype=torch.float64)
            for h in range(H):
                kv = torch.outer(k[h], v[h])
                o[h] = r[h] @ (S[h] + P["bonus"][h][:, None] * kv)  # bonus: the current token, before decay
                S[h] = decay[h][:, None] * S[h] + kv
            mu, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
            o = ((o - mu) / torch.sqrt(var + GROUP_NORM_EPS)).reshape(-1) * P["norm_weight"] + P["norm_bias"]
            out[b, t] = P["o_proj.weight"] @ (o * gate)
    return out


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_rwkv6_matches_finch_equations(mode):
    g = generator()
    cfg = MixerConfig(head_dim=4, mode=mode, chunk_size=4)
    layer = jittered(build_mixer("rwkv6", 12, cfg, AttentionConfig(num_heads=3), 1, 4), g)
    with torch.no_grad():  # keep decays in a range where exp(-exp(w)) is neither 0 nor 1
        layer.decay_base.copy_(torch.empty_like(layer.decay_base).uniform_(-2.0, 1.0, generator=g))
    x = torch.randn(2, 9, 12, generator=g)
    with torch.no_grad():
        y, _ = layer(x)
    torch.testing.assert_close(y.double(), rwkv6_reference(layer, x), rtol=1e-4, atol=1e-5)


def test_token_shift_packed_documents_start_from_their_own_previous_token():
    x = torch.randn(1, 6, 3)
    cu = torch.tensor([0, 2, 6])
    prev = torch.randn(2, 3)
    shifted, last = token_shift(x, prev, cu)
    expected = torch.stack([prev[0], x[0, 0], prev[1], x[0, 2], x[0, 3], x[0, 4]])
    assert torch.equal(shifted[0], expected)
    assert torch.equal(last, x[0, [1, 5]])


def test_autocast_keeps_the_glue_in_the_projection_dtype_and_decodes_alike():
    """Under autocast with fp32 weights and an fp32 input (the trainer's setting) the five token-shift lerps and the
    normed, gated output reach their projections in bf16, not as fp32 tensors the projections cast again; the
    shift state keeps x's dtype, and prefill + decode steps under autocast equal the full autocast forward."""
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    layer = build_mixer("rwkv6", 64, MixerConfig(num_heads=2), AttentionConfig(num_heads=2), 1, 3)
    seen = {}
    for name in ("r_proj", "k_proj", "v_proj", "g_proj", "o_proj"):
        getattr(layer, name).register_forward_pre_hook(lambda mod, a, n=name: seen.__setitem__(n, a[0].dtype))
    x = torch.randn(2, 12, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = layer(x)
        assert set(seen.values()) == {torch.bfloat16}, seen
        out, state = layer(x[:, :9])
        assert state["shift"].dtype == torch.float32
        steps = [out]
        for t in range(9, 12):
            out, state = layer(x[:, t:t + 1], state)
            steps.append(out)
    stepped = torch.cat(steps, 1).float()
    assert ((stepped - full.float()).norm() / full.float().norm()).item() < 2e-2
