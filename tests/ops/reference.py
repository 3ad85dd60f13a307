"""Float64 references: a direct loop over the equation, one sequence at a time, nothing clever.

Inputs are the public ops' arguments; everything is cast to float64 first. These are what the
fast forms are held to, so they stay obviously correct rather than fast.
"""
from __future__ import annotations

import torch


def _f64(x):
    return None if x is None else x.double()


def gla_ref(q, k, v, log_decay=None, *, bonus=None, scale=None, normalize=False, initial_state=None):
    """`S_t = diag(a_t) S_{t-1} + k_t^T v_t`; `o_t = scale q_t S_t` (bonus: `scale q_t (S_{t-1} + diag(u) k_t^T v_t)`).
    Returns (o `[B,T,H,V]`, final state `[B,H,K,V(+1)]`) in float64."""
    q, k, v, g, u, h0 = map(_f64, (q, k, v, log_decay, bonus, initial_state))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    if normalize:
        v = torch.cat([v, torch.ones(B, T, H, 1, dtype=v.dtype)], dim=-1)
    Vs = v.shape[-1]
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    final = torch.zeros(B, H, K, Vs, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(K, Vs, dtype=torch.float64) if h0 is None else h0[b, h].clone()
            for t in range(T):
                if g is None:
                    a = torch.ones(K, dtype=torch.float64)
                elif g.dim() == 1:
                    a = torch.exp(g[h]).expand(K)
                elif g.dim() == 3:
                    a = torch.exp(g[b, t, h]).expand(K)
                else:
                    a = torch.exp(g[b, t, h])
                kv = torch.outer(k[b, t, h], v[b, t, h])
                read = S + u[h].unsqueeze(1) * kv if u is not None else None
                S = a.unsqueeze(1) * S + kv
                out = scale * (q[b, t, h] @ (S if u is None else read))
                if normalize:
                    out = out[:V] / (out[V] / scale + 1e-6) / scale
                o[b, t, h] = out
            final[b, h] = S
    return o, final


def gsa_ref(q, k, v, s, log_decay, *, scale=None, initial_state=None):
    """Gated slot attention: `Kt_t = Kt_{t-1} diag(a_t) + k_t^T s_t`, `Vt_t = diag(a_t) Vt_{t-1} + s_t^T v_t`,
    `o_t = softmax(scale q_t Kt_t) Vt_t`. Returns (o `[B,T,H,V]`, (slot keys `[B,H,K,M]`, slot values `[B,H,M,V]`))
    in float64."""
    q, k, v, s, g = map(_f64, (q, k, v, s, log_decay))
    B, T, H, K = q.shape
    V, M = v.shape[-1], s.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    keys = torch.zeros(B, H, K, M, dtype=torch.float64)
    values = torch.zeros(B, H, M, V, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            Kt = torch.zeros(K, M, dtype=torch.float64) if initial_state is None else initial_state[0][b, h].double()
            Vt = torch.zeros(M, V, dtype=torch.float64) if initial_state is None else initial_state[1][b, h].double()
            for t in range(T):
                a = torch.exp(g[b, t, h])
                Kt = Kt * a.unsqueeze(0) + torch.outer(k[b, t, h], s[b, t, h])
                Vt = a.unsqueeze(1) * Vt + torch.outer(s[b, t, h], v[b, t, h])
                o[b, t, h] = torch.softmax(scale * (q[b, t, h] @ Kt), -1) @ Vt
            keys[b, h], values[b, h] = Kt, Vt
    return o, (keys, values)


def delta_rule_ref(q, k, v, beta, log_decay=None, *, scale=None, initial_state=None):
    """`S_t = a_t (I - b_t k_t^T k_t) S_{t-1} + b_t k_t^T v_t`; `o_t = scale q_t S_t`. Float64."""
    q, k, v, beta, g, h0 = map(_f64, (q, k, v, beta, log_decay, initial_state))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    final = torch.zeros(B, H, K, V, dtype=torch.float64)
    eye = torch.eye(K, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(K, V, dtype=torch.float64) if h0 is None else h0[b, h].clone()
            for t in range(T):
                a = 1.0 if g is None else torch.exp(g[b, t, h])
                kt, bt = k[b, t, h], beta[b, t, h]
                S = a * (eye - bt * torch.outer(kt, kt)) @ S + bt * torch.outer(kt, v[b, t, h])
                o[b, t, h] = scale * (q[b, t, h] @ S)
            final[b, h] = S
    return o, final


def short_conv_ref(x, weight, bias=None, *, activation="silu", initial_state=None):
    """`y_t[c] = act(bias[c] + sum_w weight[c, w] x_{t-W+1+w}[c])`, earlier inputs from the state."""
    x, weight, bias, h0 = map(_f64, (x, weight, bias, initial_state))
    B, T, C = x.shape
    W = weight.shape[1]
    hist = torch.zeros(B, C, W - 1, dtype=torch.float64) if h0 is None else h0.clone()
    full = torch.cat([hist, x.transpose(1, 2)], dim=2)  # [B, C, W-1+T]
    y = torch.zeros(B, T, C, dtype=torch.float64)
    for t in range(T):
        for w in range(W):
            y[:, t] += weight[:, w] * full[:, :, t + w]
        if bias is not None:
            y[:, t] += bias
    if activation == "silu":
        y = y * torch.sigmoid(y)
    return y, full[:, :, T:]


def attention_ref(q, k, v, *, cu_seqlens=None, sliding_window=0, scale=None):
    """Softmax attention by a loop over queries, float64; GQA by head groups."""
    q, k, v = map(_f64, (q, k, v))
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    seq = torch.zeros(T, dtype=torch.long)
    if cu_seqlens is not None:
        for n in range(len(cu_seqlens) - 1):
            seq[cu_seqlens[n]:cu_seqlens[n + 1]] = n
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            for i in range(T):
                js = [j for j in range(i + 1) if seq[j] == seq[i] and (sliding_window == 0 or i - j < sliding_window)]
                scores = torch.stack([scale * (q[b, i, h] @ k[b, j, hk]) for j in js])
                p = torch.softmax(scores, 0)
                o[b, i, h] = sum(p[n] * v[b, j, hk] for n, j in enumerate(js))
    return o
