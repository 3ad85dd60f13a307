"""Mixture-of-Memories against a float64 step-by-step implementation of the paper: top-k routing,
each memory updated only by its routed tokens (GLA or Gated DeltaNet), reads mixed by the routing
weights, a shared memory, gated RMSNorm; plus the load-balancing loss. Written without the ops."""
from __future__ import annotations

import pytest
import torch

from layer_testing import causal_conv, float64_params, generator, jittered
from linear_moe.layers import AttentionConfig, MixerConfig, build_mixer


def silu(x):
    return x * torch.sigmoid(x)


def unit(x):
    return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def mom_reference(layer, x: torch.Tensor, memory: str) -> torch.Tensor:
    x = x.double()
    P = float64_params(layer)
    H, K, V, M = layer.num_heads, layer.head_k_dim, layer.head_v_dim, layer.num_memories
    E = M + layer.num_shared
    B, T, C = x.shape
    out = torch.zeros(B, T, C, dtype=torch.float64)
    for b in range(B):
        xb = x[b]
        act = (lambda z, n: causal_conv(z, P[f"{n}_conv.weight"])) if layer.use_short_conv else (lambda z, n: silu(z))
        q = act(xb @ P["q_proj.weight"].T, "q").view(T, H, K)
        k = act(xb @ P["k_proj.weight"].T, "k").view(T, E, H, K)
        v = act(xb @ P["v_proj.weight"].T, "v").view(T, E, H, V)
        probs = torch.softmax(xb @ P["router.weight"].T, -1)
        if memory == "gla":
            gate = (xb @ P["gate_down.weight"].T) @ P["gate_up.weight"].T + P["gate_up.bias"]
            alpha = (torch.sigmoid(gate) ** (1.0 / layer.gate_logit_normalizer)).view(T, E, H, K)
        else:
            q = unit(q)
            beta = torch.sigmoid(xb @ P["b_proj.weight"].T).view(T, E, H)
            dt = torch.nn.functional.softplus((xb @ P["a_proj.weight"].T).view(T, E, H) + P["dt_bias"])
            alpha = torch.exp(-torch.exp(P["A_log"]) * dt)  # [T, E, H]
        S = torch.zeros(E, H, K, V, dtype=torch.float64)
        for t in range(T):
            top = torch.topk(probs[t], layer.topk).indices.tolist()
            weight = {m: (probs[t, m] / probs[t, top].sum()).item() for m in top}
            if layer.num_shared:
                weight[M] = 1.0
            o = torch.zeros(H, V, dtype=torch.float64)
            for m, w in weight.items():  # memories the token is not routed to are left untouched
                for h in range(H):
                    if memory == "gla":
                        S[m, h] = alpha[t, m, h][:, None] * S[m, h] + torch.outer(k[t, m, h], v[t, m, h])
                    else:
                        kk = unit(k[t, m, h])
                        S[m, h] = alpha[t, m, h] * S[m, h]
                        S[m, h] = S[m, h] + beta[t, m, h] * torch.outer(kk, v[t, m, h] - kk @ S[m, h])
                    o[h] += w * K ** -0.5 * (q[t, h] @ S[m, h])
            o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * P["out_norm.weight"]
            o = o * silu(P["g_proj.weight"] @ xb[t]).view(H, V)
            out[b, t] = P["o_proj.weight"] @ o.reshape(-1)
    return out


@pytest.mark.parametrize("memory", ["gla", "gated_deltanet"])
@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
@pytest.mark.parametrize("shared,short_conv", [(True, True), (False, False)])
def test_mom_matches_routed_memories(memory, mode, shared, short_conv):
    g = generator()
    cfg = MixerConfig(head_dim=4, num_memories=3, topk_memories=2, shared_memory=shared, mode=mode, chunk_size=4,
                      use_short_conv=short_conv)
    layer = jittered(build_mixer(f"mom_{memory}", 12, cfg, AttentionConfig(num_heads=2), 0, 1), g)
    x = torch.randn(2, 9, 12, generator=g)
    with torch.no_grad():
        y, _ = layer(x)
    torch.testing.assert_close(y.double(), mom_reference(layer, x, memory), rtol=1e-4, atol=1e-5)


def test_aux_loss_is_the_switch_balance_loss_in_training_only():
    g = generator()
    cfg = MixerConfig(head_dim=4, num_memories=4, topk_memories=2, memory_aux_loss_coef=0.1)
    layer = jittered(build_mixer("mom_gla", 12, cfg, AttentionConfig(num_heads=2), 0, 1), g).train()
    x = torch.randn(2, 7, 12, generator=g)
    layer(x)
    probs = torch.softmax(x.double() @ layer.router.weight.detach().double().T, -1).reshape(-1, 4)
    chosen = torch.zeros_like(probs).scatter(-1, probs.topk(2, -1).indices, 1.0)
    expected = 0.1 * 4 * ((chosen.mean(0) / 2) * probs.mean(0)).sum()
    assert layer.aux_loss.requires_grad
    torch.testing.assert_close(layer.aux_loss.double(), expected, rtol=1e-5, atol=1e-7)
    layer.eval()
    layer(x)
    assert layer.aux_loss is None
