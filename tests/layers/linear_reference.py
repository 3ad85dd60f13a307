"""Float64 step-by-step references of the part-1 linear mixers, written from the papers' equations.

Each ``ref_<mixer>(module, x)`` reads the module's weights (as float64) and recomputes its output one
token at a time with explicit recurrent states. Nothing here calls ``linear_moe.ops`` or the layers'
helpers, so a shared bug cannot hide.
"""
from __future__ import annotations

import math

import torch

from layer_testing import causal_conv, float64_params


def _lin(x, w):
    return x @ w.T


def _silu(x):
    return x / (1 + torch.exp(-x))


def _sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def _softplus(x):
    return torch.log1p(torch.exp(x))


def _heads(x, H):
    return x.view(x.shape[0], x.shape[1], H, -1)


def _rep(x, groups):
    return x.repeat_interleave(groups, dim=2)


def _l2(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _norm_gate(o, gate, norm, gate_fn, weight=None, bias=None, eps=1e-5):
    """Per-head norm of o [B, T, H, D], then times gate_fn(gate) (gate None: no gate)."""
    if norm == "rmsnorm":
        o = o / torch.sqrt((o * o).mean(-1, keepdim=True) + eps) * weight
    elif norm == "groupnorm":
        mu = o.mean(-1, keepdim=True)
        var = ((o - mu) ** 2).mean(-1, keepdim=True)
        o = (o - mu) / torch.sqrt(var + eps) * weight + bias
    if gate is not None:
        g = gate.view(o.shape)
        o = o * {"swish": _silu(g), "sigmoid": _sigmoid(g), "identity": g}[gate_fn]
    return o.flatten(-2)


def _feature(name, x):
    d = x.shape[-1]
    if name == "identity":
        return x
    if name == "elu":
        return torch.where(x > 0, x + 1, torch.exp(x))
    if name == "swish":
        return _silu(x)
    if name == "taylor":  # full outer product (the layer stores the upper triangle)
        outer = (x[..., :, None] * x[..., None, :]).flatten(-2)
        return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, outer / (math.sqrt(2) * math.sqrt(d))], -1)
    raise KeyError(name)


def _linear_scan(q, k, v, decay=None, scale=1.0, normalize=False):
    """S_t = decay_t ⊙ S_{t-1} + k_tᵀ v_t; o_t = scale q_t S_t (or normalised). decay [B, T, H, K] or None."""
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=q.dtype)
    z = torch.zeros(B, H, K, dtype=q.dtype)
    out = []
    for t in range(T):
        if decay is not None:
            S = S * decay[:, t, :, :, None]
            z = z * decay[:, t]
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + k[:, t]
        num = torch.einsum("bhk,bhkv->bhv", q[:, t], S)
        if normalize:
            out.append(num / ((q[:, t] * z).sum(-1, keepdim=True) + 1e-6))
        else:
            out.append(scale * num)
    return torch.stack(out, 1)


def ref_linear_attention(m, x, feature_map="elu", normalize=False):
    w = float64_params(m)
    H, KVH = m.num_heads, m.num_kv_heads
    q = _feature(feature_map, _heads(_lin(x, w["q_proj.weight"]), H))
    k = _rep(_feature(feature_map, _heads(_lin(x, w["k_proj.weight"]), KVH)), H // KVH)
    v = _rep(_heads(_lin(x, w["v_proj.weight"]), KVH), H // KVH)
    # the layer's scale uses its stored feature width; the full outer product is longer than the triangle
    width = m.feature_map.out_dim
    o = _linear_scan(q, k, v, scale=width ** -0.5, normalize=normalize)
    return _lin(_norm_gate(o, None, "rmsnorm", None, w["out_norm.weight"]), w["o_proj.weight"])


def _rope(x, theta=10000.0):
    """Half-split rotation of x [B, T, H, D] by position t."""
    B, T, H, D = x.shape
    half = D // 2
    out = x.clone()
    for t in range(T):
        for i in range(half):
            ang = t * theta ** (-2 * i / D)
            c, s = math.cos(ang), math.sin(ang)
            out[:, t, :, i] = x[:, t, :, i] * c - x[:, t, :, i + half] * s
            out[:, t, :, i + half] = x[:, t, :, i + half] * c + x[:, t, :, i] * s
    return out


def ref_retention(m, x, norm="rmsnorm", gate_fn="swish"):
    w, H = float64_params(m), m.num_heads
    q = _rope(_heads(_lin(x, w["q_proj.weight"]), H))
    k = _rope(_heads(_lin(x, w["k_proj.weight"]), H))
    v = _heads(_lin(x, w["v_proj.weight"]), H)
    gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(H)], dtype=torch.float64)
    decay = gamma.view(1, 1, H, 1).expand(*q.shape).contiguous()
    o = _linear_scan(q, k, v, decay, scale=q.shape[-1] ** -0.5)
    gate = _lin(x, w["g_proj.weight"])
    return _lin(_norm_gate(o, gate, norm, gate_fn, w["out_norm.weight"], w.get("out_norm.bias")), w["o_proj.weight"])


def ref_lightning(m, x, layer_idx, num_layers):
    w, H = float64_params(m), m.num_heads
    assert H & (H - 1) == 0, "reference slopes written for a power-of-two head count"
    slopes = [2.0 ** (-8.0 * (h + 1) / H) for h in range(H)]
    ratio = 1 - layer_idx / (num_layers - 1) + 1e-5
    q = _silu(_heads(_lin(x, w["q_proj.weight"]), H))
    k = _silu(_heads(_lin(x, w["k_proj.weight"]), H))
    v = _heads(_lin(x, w["v_proj.weight"]), H)
    decay = torch.tensor([math.exp(-s * ratio) for s in slopes], dtype=torch.float64).view(1, 1, H, 1).expand(*q.shape)
    o = _linear_scan(q, k, v, decay.contiguous(), scale=1.0)
    gate = _lin(x, w["g_proj.weight"])
    return _lin(_norm_gate(o, gate, "rmsnorm", "swish", w["out_norm.weight"]), w["o_proj.weight"])


def ref_gla(m, x, gated=True):
    w, H, KVH = float64_params(m), m.num_heads, m.num_kv_heads
    q = _heads(_lin(x, w["q_proj.weight"]), H)
    k = _rep(_heads(_lin(x, w["k_proj.weight"]), KVH), H // KVH)
    v = _rep(_heads(_lin(x, w["v_proj.weight"]), KVH), H // KVH)
    logits = _lin(_lin(x, w["gk_proj.0.weight"]), w["gk_proj.1.weight"]) + w["gk_proj.1.bias"]
    alpha = _sigmoid(logits) ** (1.0 / m.gate_logit_normalizer)  # α = sigmoid(·)^(1/τ)
    alpha = _rep(_heads(alpha, KVH), H // KVH)
    o = _linear_scan(q, k, v, alpha, scale=q.shape[-1] ** -0.5)
    gate = _lin(x, w["g_proj.weight"]) if gated else None
    return _lin(_norm_gate(o, gate, "rmsnorm", "swish", w["out_norm.weight"]), w["o_proj.weight"])


def ref_deltanet(m, x, gated=False, short_conv=True, gate_fn="swish"):
    w, H = float64_params(m), m.num_heads
    B, T, _ = x.shape

    def branch(n):
        y = _lin(x, w[f"{n}_proj.weight"])
        return causal_conv(y, w[f"convs.{n}.weight"]) if short_conv else _silu(y)

    q, k = _l2(_heads(branch("q"), H)), _l2(_heads(branch("k"), H))
    v = _heads(branch("v"), H)
    beta = _sigmoid(_lin(x, w["b_proj.weight"]))
    if gated:
        a = torch.exp(-torch.exp(w["A_log"]) * _softplus(_lin(x, w["a_proj.weight"]) + w["dt_bias"]))
    S = torch.zeros(B, H, q.shape[-1], v.shape[-1], dtype=x.dtype)
    out = []
    for t in range(T):
        if gated:
            S = S * a[:, t, :, None, None]
        kt, vt, bt = k[:, t], v[:, t], beta[:, t, :, None]
        pred = torch.einsum("bhk,bhkv->bhv", kt, S)                 # what the memory returns for k_t
        S = S + kt[..., :, None] * (bt * (vt - pred))[..., None, :]  # write the correction, weighted by β
        out.append(q.shape[-1] ** -0.5 * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(out, 1)
    gate = _lin(x, w["g_proj.weight"]) if gated else None
    return _lin(_norm_gate(o, gate, "rmsnorm", gate_fn, w["out_norm.weight"]), w["o_proj.weight"])


def ref_mamba2(m, x, gated=True):
    w = float64_params(m)
    H, G, N, P = m.num_heads, m.num_groups, m.state_size, m.head_dim
    B, T, _ = x.shape
    xbc = torch.cat([_lin(x, w["x_proj.weight"]), _lin(x, w["bc_proj.weight"])], -1)
    xbc = causal_conv(xbc, w["conv.weight"], w["conv.bias"])
    xs = xbc[..., :H * P].reshape(B, T, H, P)
    Bm = xbc[..., H * P:H * P + G * N].reshape(B, T, G, N)
    Cm = xbc[..., H * P + G * N:].reshape(B, T, G, N)
    dt = _softplus(_lin(x, w["dt_proj.weight"]) + w["dt_bias"])  # [B, T, H]
    A = -torch.exp(w["A_log"])
    h = torch.zeros(B, H, N, P, dtype=x.dtype)
    ys = []
    for t in range(T):
        hs = []
        for head in range(H):
            g = head // (H // G)
            hh = torch.exp(dt[:, t, head] * A[head])[:, None, None] * h[:, head] \
                + dt[:, t, head, None, None] * Bm[:, t, g, :, None] * xs[:, t, head, None, :]
            hs.append(hh)
        h = torch.stack(hs, 1)
        y = torch.stack([torch.einsum("bn,bnp->bp", Cm[:, t, head // (H // G)], h[:, head]) for head in range(H)], 1)
        ys.append(y + w["D"][:, None] * xs[:, t])
    y = torch.stack(ys, 1).reshape(B, T, H * P)
    if gated:
        y = y * _silu(_lin(x, w["z_proj.weight"]))
    yg = y.view(B, T, G, -1)
    y = (yg / torch.sqrt((yg * yg).mean(-1, keepdim=True) + 1e-5)).reshape(B, T, H * P) * w["norm_weight"]
    return _lin(y, w["o_proj.weight"])
