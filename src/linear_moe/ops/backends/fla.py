"""Backend "fla": our op API mapped onto fla-core 0.6.0's Triton kernels.

Conventions bridged here (ours -> fla):
- layouts are the same (`[batch, time, heads, dim]`, states `[N, heads, k_dim, v_dim]`); fla
  takes natural-log gates, like our `log_decay`, and converts to log2 inside.
- `log_decay` None -> chunk_simple_gla without gate; `[H]` -> chunk_simple_gla(g_gamma);
  `[B,T,H]` -> chunk_simple_gla(g); `[B,T,H,K]` -> chunk_gla; any decay with `bonus` ->
  chunk_gla on queries one token early (`_rwkv6_on_chunk_gla`), or with `LINEAR_MOE_RWKV6_CHUNK=chunk_rwkv6`
  fla's chunk_rwkv6 (decay broadcast to `[B,T,H,K]`). delta_rule -> chunk_(gated_)delta_rule.
  gsa -> chunk_gsa (its slot-key pass decays the value dim, which our gla cannot).
  norm_gate -> fla.modules' rms_norm_gated / layer_norm_gated.
  mode "recurrent" (or one token) uses the fused_recurrent_* kernels.
- `normalize`: a ones column is appended to v (so the state carries z), output divided by it; in bf16/fp16 a
  zero column too where that makes the width odd (fla's backward needs it even), dropped from the state.
- short_conv: fla's state is the last W inputs `[N, C, W]`, ours the last W-1 `[N, C, W-1]`.

On Hopper with Triton >= 3.4, < 3.7.1 fla's gated backward step is miscompiled (fla #640) and
fla raises; `install_dqkwg_fix` registers our Triton version into fla's backend dispatch first.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from linear_moe.ops._checks import cached_cast
from linear_moe.ops.backends import cuda_capability, fla_version, hopper_dqkwg_bug, optional_module, triton_version
from linear_moe.ops.backends.tuning import seed_triton_cache

_fix = {"installed": False, "enabled": False}
if torch.cuda.is_available():  # this module is imported before fla's first kernel runs: start it tuned
    seed_triton_cache(torch.cuda.get_device_capability(), triton_version(), fla_version())


def install_dqkwg_fix(device: torch.device | None = None) -> bool:
    """Register our `chunk_bwd_dqkwg` into fla's dispatch (once). Enabled where fla's own is
    known-bad; `use_our_dqkwg` switches it for comparisons. Returns whether it is enabled."""
    if not _fix["installed"]:
        import fla.ops.common.chunk_o  # noqa: F401  (creates fla's 'common' registry)
        from fla.backends import BaseBackend, register

        from linear_moe.ops.backends.triton.dqkwg import chunk_bwd_dqkwg

        class LinearMoeDqkwg(BaseBackend):
            backend_type = "linear_moe_triton"
            priority = 0  # ahead of fla's own candidates (tilelang is 5)

            def is_enabled(self) -> bool:
                return _fix["enabled"]

            def chunk_bwd_dqkwg(self, *args, **kwargs):
                return chunk_bwd_dqkwg(*args, **kwargs)

            def chunk_bwd_dqkwg_verifier(self, *args, **kwargs):
                # only the gated step is miscompiled: ungated calls (linear attention, retention's g_gamma,
                # DeltaNet) keep fla's own kernel, which measured faster than ours at 2K-8K on the H100
                return _takes_dqkwg_fix(*args, **kwargs)

        register("common")(LinearMoeDqkwg)
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        _fix["enabled"] = hopper_dqkwg_bug(cuda_capability(device), triton_version())
        _fix["installed"] = True
    return _fix["enabled"]


def _takes_dqkwg_fix(*args, **kwargs) -> tuple[bool, str | None]:
    """fla's verifier protocol for our ``chunk_bwd_dqkwg``: (accepted, reason). ``g`` is its 8th argument."""
    g = kwargs["g"] if "g" in kwargs else (args[7] if len(args) > 7 else None)
    return (True, None) if g is not None else (False, "ungated: fla's own kernel is correct")


def use_our_dqkwg(enabled: bool) -> None:
    """Force our backward step on (True) or fla's own (False), e.g. to benchmark both."""
    install_dqkwg_fix()
    _fix["enabled"] = enabled


def _prepare(q, initial_state, cu_seqlens):
    install_dqkwg_fix(q.device)
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs batch size 1, got q of shape {tuple(q.shape)}")
    state = initial_state.float().contiguous() if initial_state is not None else None
    return state, _long_cu(cu_seqlens)


def _long_cu(cu_seqlens):
    """``cu_seqlens`` as int64, the same tensor object for every call with the same source tensor (and content).

    fla memoises its chunk indices by the identity of the cu_seqlens it is handed; building them reads the boundaries
    on the host (a device sync). A fresh ``.long()`` copy per call (the packer's int32) missed that cache in every
    layer, so each op call synced; one copy per step lets every layer after the first hit it."""
    return cached_cast(cu_seqlens, torch.int64)


def _recurrent(mode: str, T: int) -> bool:
    if mode not in ("auto", "chunk", "recurrent"):
        raise ValueError(f"mode={mode!r} is unknown; allowed: 'auto', 'chunk', 'recurrent'")
    return mode == "recurrent" or (mode == "auto" and T == 1)


def gla(q, k, v, log_decay=None, *, bonus=None, scale=None, normalize=False, initial_state=None,
        output_final_state=False, cu_seqlens=None, mode="auto", chunk_size=64, backend=None):
    """Gated linear attention on fla kernels; same contract as `linear_moe.ops.gla`.

    q, k `[B,T,H,K]`, v `[B,T,H,V]`, log_decay None | `[H]` | `[B,T,H]` | `[B,T,H,K]`,
    bonus `[H,K]`. Returns (o `[B,T,H,V]` in q.dtype, final state `[N,H,K,V(+1)]` fp32 or None).
    """
    B, T, H, K = q.shape
    state, cu = _prepare(q, initial_state, cu_seqlens)
    scale = K ** -0.5 if scale is None else scale
    k, v = k.to(q.dtype), v.to(q.dtype)  # fla's kernels take one dtype (e.g. HGRN2's fp32 keys under autocast)
    V = v.shape[-1]
    half = q.dtype in (torch.bfloat16, torch.float16)
    if normalize:  # z_t rides along as an extra value column; contract: no scale on q . S
        v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
        scale = 1.0
    width = v.shape[-1]  # V (+ 1 with normalize): what the returned state keeps
    # fla's 16-bit backward wants even key and value widths: a zero value column (GSA's 1, V + 1) and a zero key
    # feature (Based's 153), which adds nothing to q . S; both are dropped from the output and state below
    pad_v, pad_k = (width % 2, K % 2) if half else (0, 0)
    if pad_v:
        v = F.pad(v, (0, 1))
    if pad_k:
        q, k = F.pad(q, (0, 1)), F.pad(k, (0, 1))
        if log_decay is not None and log_decay.dim() == 4:
            log_decay = F.pad(log_decay, (0, 1))
        if bonus is not None:
            bonus = F.pad(bonus, (0, 1))
    if state is not None and (pad_v or pad_k):
        state = F.pad(state, (0, pad_v, 0, pad_k)).contiguous()
    recurrent = _recurrent(mode, T)
    common = dict(scale=scale, initial_state=state, output_final_state=output_final_state,
                  cu_seqlens=cu)
    g = log_decay.float() if log_decay is not None else None
    if bonus is not None:
        from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
        w = torch.zeros_like(q, dtype=torch.float32) if g is None else g
        if w.dim() == 1:
            w = w[None, None, :, None].expand_as(q)
        elif w.dim() == 3:
            w = w[..., None].expand_as(q)
        if recurrent:
            o, s = fused_recurrent_rwkv6(q, k, v, w.contiguous(), bonus.to(q.dtype), **common)
        elif rwkv6_chunk_route() == "chunk_gla_shifted_q":
            o, s = _rwkv6_on_chunk_gla(q, k, v, w, bonus, **common)
        else:
            o, s = chunk_rwkv6(q, k, v, w.contiguous(), bonus.to(q.dtype), **common)
    elif g is not None and g.dim() == 4:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
        if recurrent:
            o, s = fused_recurrent_gla(q, k, v, gk=g, **common)
        else:
            o, s = chunk_gla(q, k, v, g, **common)
    else:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
        fn = fused_recurrent_simple_gla if recurrent else chunk_simple_gla
        gates = {} if g is None else ({"g_gamma": g} if g.dim() == 1 else {"g": g})
        o, s = fn(q, k, v, **gates, **common)
    if normalize:
        o = o[..., :V].float() / (o[..., V:V + 1].float() + 1e-6)
    return o[..., :V].to(q.dtype), (s[:, :, :K, :width].float() if output_final_state else None)


RWKV6_CHUNK_ROUTES = ("chunk_gla_shifted_q", "chunk_rwkv6")


def rwkv6_chunk_route() -> str:
    """RWKV6's chunk-mode kernel, chosen by ``LINEAR_MOE_RWKV6_CHUNK``: ``chunk_gla_shifted_q`` (the default,
    ``_rwkv6_on_chunk_gla``) or fla's ``chunk_rwkv6``. On the H100 (2026-11-25, s8) fwd+bwd at 32K tokens, H=16,
    D=128: 8.36 ms against chunk_rwkv6's 9.23 (8.20 / 8.68 at 2K, 8.34 / 8.84 at 8K)."""
    route = os.environ.get("LINEAR_MOE_RWKV6_CHUNK", RWKV6_CHUNK_ROUTES[0])
    if route not in RWKV6_CHUNK_ROUTES:
        raise ValueError(f"LINEAR_MOE_RWKV6_CHUNK={route!r} is unknown; allowed: {', '.join(RWKV6_CHUNK_ROUTES)}")
    return route


def _rwkv6_on_chunk_gla(q, k, v, w, bonus, *, scale, initial_state, output_final_state, cu_seqlens):
    """RWKV6 (gla with ``bonus``) on fla's chunk_gla with the queries one token early. w: log decay
    ``[B,T,H,K]``. Returns (o ``[B,T,H,V]`` in q's dtype, final state ``[N,H,K,V]`` fp32 or None).

    RWKV6 reads the state before its own step, GLA after it, over the same recurrence
    ``S_t = diag(exp w_t) S_{t-1} + k_t^T v_t``: ours ``o_t = scale q_t S_{t-1} + bonus``, GLA's ``o'_t = scale
    q'_t S_t``. Give GLA ``q'_t = q_{t+1}`` and ``o'_{t-1}`` is our ``o_t``
    without the bonus; at a sequence's first token that is ``scale q_t S_init`` instead (0 without an initial
    state), and the final state is GLA's own. Only q and o move one token (16-bit, one pass each way), where
    shifting k, v and the fp32 decay instead cost ~10 ms of torch passes at 32K tokens on the H100. The shift back
    and the bonus ``scale (q_t . u . k_t) v_t`` are one kernel each way on CUDA (``rwkv6_bonus``; its backward also
    adds chunk_gla's gradients and rolls the query's back, through ``rwkv6_bonus.tap``). Never
    crosses a cu_seqlens boundary; no host sync.
    """
    from fla.ops.gla import chunk_gla

    B, T, H, K = q.shape
    starts = torch.zeros(1, dtype=torch.long, device=q.device) if cu_seqlens is None else cu_seqlens[:-1]
    # T + 1 slots: an empty sequence at the end starts at T (the spare slot)
    first = torch.zeros(T + 1, dtype=torch.bool, device=q.device).index_fill_(0, starts, True)[:T]
    # a sequence's last token gets the next one's first query: its output lands on that first token, which
    # is overwritten below, so nothing crosses a boundary (in either pass) and q needs no mask
    kernel = _bonus_kernel(q)
    if kernel is not None:  # both backward passes meet in one kernel (rwkv6_bonus.tap)
        q_early, k_in, v_in, link = kernel.tap(q, k, v, bonus, scale)
        o_early, s = chunk_gla(q_early, k_in, v_in, w, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        o = kernel.shift_and_bonus(o_early, q, k, v, bonus, first.repeat(B), scale, link=link)
    else:
        o_early, s = chunk_gla(q.roll(-1, dims=1), k, v, w, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        o = _shift_and_bonus_torch(o_early, q, k, v, bonus, first, scale)
    if initial_state is not None:  # each sequence's first token reads its initial state (it got 0 above)
        if cu_seqlens is None:
            head = scale * torch.einsum("bhk,bhkv->bhv", q[:, 0].float(), initial_state)  # [B, H, V]
            o = torch.cat([o[:, :1] + head[:, None].to(o.dtype), o[:, 1:]], dim=1)
        else:
            nonempty = cu_seqlens[1:] > cu_seqlens[:-1]
            head = scale * torch.einsum("nhk,nhkv->nhv", q[0, starts.clamp(max=T - 1)].float(), initial_state)
            at = torch.where(nonempty, starts, T)  # empty sequences write the spare slot
            heads = torch.zeros(T + 1, H, head.shape[-1], dtype=o.dtype, device=q.device).index_copy(
                0, at, head.to(o.dtype))[:T]
            o = o + heads[None]
    return o, s


def _bonus_kernel(q: torch.Tensor):
    """Our Triton shift-and-bonus kernel module (``triton/rwkv6_bonus.py``) for CUDA tensors, else None."""
    return optional_module("linear_moe.ops.backends.triton.rwkv6_bonus") if q.is_cuda else None


def _shift_and_bonus_torch(o_early, q, k, v, bonus, first, scale):
    """``o[t] = (0 at a sequence's first token, else o_early[t - 1]) + scale (q[t] . u . k[t]) v[t]`` in torch passes
    (a roll, a mask, the bonus: 3.9 ms at 32K tokens on the H100), where our Triton kernel does not run."""
    T = q.shape[1]
    o = o_early.roll(1, dims=1).masked_fill(first.view(1, T, 1, 1), 0)
    dot = torch.linalg.vecdot(q * bonus.to(q.dtype), k)  # [B, T, H]
    return o + (scale * dot)[..., None] * v


def gsa(q, k, v, s, log_decay, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
        mode="auto", chunk_size=64):
    """Gated slot attention on fla's ``chunk_gsa`` / ``fused_recurrent_gsa``; same contract as
    `linear_moe.ops.gsa` (fla's state pair is ours: slot keys `[N,H,K,M]`, slot values `[N,H,M,V]`).
    chunk_size is fla's own (64)."""
    from fla.ops.gsa import chunk_gsa, fused_recurrent_gsa

    K = q.shape[-1]
    _, cu = _prepare(q, None, cu_seqlens)
    state = None if initial_state is None else tuple(h.float().contiguous() for h in initial_state)
    k, v, s = k.to(q.dtype), v.to(q.dtype), s.to(q.dtype)  # one dtype for fla's kernels; the gate stays fp32
    fn = fused_recurrent_gsa if _recurrent(mode, q.shape[1]) else chunk_gsa
    o, final = fn(q, k, v, s, log_decay.float(), scale=K ** -0.5 if scale is None else scale,
                  initial_state=state, output_final_state=output_final_state,
                  cu_seqlens=cu)
    return o.to(q.dtype), (tuple(h.float() for h in final) if output_final_state else None)


def norm_gate(x, gate, weight, bias=None, *, norm="rmsnorm", activation="swish", eps=1e-5):
    """``norm(x) * activation(gate)`` on fla's fused gated-norm kernel; same contract as `linear_moe.ops.norm_gate`
    (norm rmsnorm | groupnorm, activation swish | silu | sigmoid). The gate is cast to x's dtype: fla returns its
    gradient in that dtype."""
    from fla.modules.norm.fused_norm_gate import layer_norm_gated, rms_norm_gated

    fn = rms_norm_gated if norm == "rmsnorm" else layer_norm_gated
    return fn(x, gate.to(x.dtype), weight, bias, activation="sigmoid" if activation == "sigmoid" else "swish", eps=eps)


def delta_rule(q, k, v, beta, log_decay=None, *, scale=None, initial_state=None,
               output_final_state=False, cu_seqlens=None, mode="auto", chunk_size=64,
               backend=None, qk_l2norm=False):
    """(Gated) delta rule on fla kernels; same contract as `linear_moe.ops.delta_rule`.

    q, k `[B,T,H,K]`, v `[B,T,H,V]`, beta `[B,T,H]`, log_decay None | `[B,T,H]`; ``qk_l2norm``: fla normalises q
    and k inside the kernel call. Returns (o in q.dtype, final state fp32 or None).
    """
    T = q.shape[1]
    state, cu = _prepare(q, initial_state, cu_seqlens)
    k, v = k.to(q.dtype), v.to(q.dtype)
    common = dict(scale=scale, initial_state=state, output_final_state=output_final_state,
                  cu_seqlens=cu, use_qk_l2norm_in_kernel=bool(qk_l2norm))
    beta = beta.to(q.dtype)
    recurrent = _recurrent(mode, T)
    if log_decay is None:
        from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
        fn = fused_recurrent_delta_rule if recurrent else chunk_delta_rule
        o, s = fn(q, k, v, beta, **common)
    else:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        if recurrent:
            o, s = fused_recurrent_gated_delta_rule(q, k, v, g=log_decay.float(), beta=beta, **common)
        else:
            o, s = chunk_gated_delta_rule(q, k, v, log_decay.float(), beta, **common)
    return o.to(q.dtype), (s.float() if output_final_state else None)


def short_conv(x, weight, bias=None, *, activation="silu", initial_state=None,
               output_final_state=False, cu_seqlens=None):
    """Causal depthwise conv on fla's Triton kernel; same contract as `linear_moe.ops.short_conv`.

    x `[B,T,C]`, weight `[C,W]`, bias `[C]`; state `[N,C,W-1]` (ours) <-> `[N,C,W]` (fla).
    """
    from fla.modules.causal_conv1d import causal_conv1d

    if activation not in ("silu", None):
        raise ValueError(f"activation={activation!r} is unknown; allowed: 'silu', None")
    state = None
    if initial_state is not None:  # fla keeps one more (oldest) input, never read: pad it
        state = F.pad(initial_state, (1, 0)).to(x.dtype).contiguous()
    y, s = causal_conv1d(x, weight, bias, initial_state=state, output_final_state=output_final_state,
                         activation=activation, cu_seqlens=_long_cu(cu_seqlens))
    return y, (s[..., 1:].float() if output_final_state else None)
