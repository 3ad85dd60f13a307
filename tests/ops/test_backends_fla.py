"""Plumbing of the fla wrapper (backends/fla.py) on CPU, against a stand-in `fla` package.

The stand-in implements fla-core 0.6.0's conventions (natural-log gates, g vs g_gamma, rwkv6's
bonus, the causal conv's `[N, D, W]` state) with our torch ops, so these tests check that the
wrapper picks the right fla function and converts arguments, normalisation and states right, and
that RWKV6's chunk mode (decay broadcast, bonus, packed sequences) equals the float64 reference with
its gradients. fla's real kernels are checked on GPU by benchmarks/ops_bench.py.
"""

import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from linear_moe import ops
try:  # imported before the fixture swaps the package for a stand-in
    from linear_moe.ops.backends.triton import rwkv6_bonus
except ImportError:  # no Triton on this machine
    rwkv6_bonus = None
from ops_testing import assert_close_with_grads, gla_inputs, grads_of, randn, reference, time_slice

CALLS = []
REGISTERED = []  # backend classes the wrapper registers into (fake) fla dispatch
SEEN_QK = []  # (q, k) as the fake fla delta-rule kernels received them with use_qk_l2norm_in_kernel


def _gla(name):
    def fn(q, k, v, g=None, g_gamma=None, gk=None, scale=None, initial_state=None,
           output_final_state=False, cu_seqlens=None):
        CALLS.append(name)
        decay = next((x for x in (g, g_gamma, gk) if x is not None), None)
        return ops.gla(q, k, v, decay, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend="torch")
    return fn


def _rwkv6(name):
    def fn(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
        CALLS.append(name)
        return ops.gla(r, k, v, w, bonus=u, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend="torch")
    return fn


def _delta(name, gated):
    def fn(q, k, v, *args, g=None, beta=None, scale=None, initial_state=None,
           output_final_state=False, cu_seqlens=None, use_qk_l2norm_in_kernel=False):
        CALLS.append(name + ("+l2norm" if use_qk_l2norm_in_kernel else ""))
        if gated and args:  # chunk_gated_delta_rule(q, k, v, g, beta, ...)
            g, beta = args
        elif args:  # chunk_delta_rule(q, k, v, beta, ...)
            (beta,) = args
        if use_qk_l2norm_in_kernel:  # fla normalises the raw q and k it is handed
            SEEN_QK.append((q, k))
        return ops.delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                              backend="torch", qk_l2norm=use_qk_l2norm_in_kernel)
    return fn


def _causal_conv1d(x, weight, bias=None, initial_state=None, output_final_state=False,
                   activation=None, cu_seqlens=None):
    """fla's convention: state = the last W inputs `[N, D, W]`, slot 0 never read."""
    CALLS.append("causal_conv1d")
    W = weight.shape[1]
    state = None if initial_state is None else initial_state[..., 1:]
    y, s = ops.short_conv(x, weight, bias, activation=activation, initial_state=state,
                          output_final_state=True, cu_seqlens=cu_seqlens)
    full = torch.cat([torch.full_like(s[..., :1], float("nan")), s], -1)  # slot 0: never read
    assert full.shape[-1] == W
    return y, (full if output_final_state else None)


def _gsa(name):
    def fn(q, k, v, s, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
        CALLS.append(name)
        assert q.dtype == k.dtype == v.dtype == s.dtype and g.dtype == torch.float32  # as fla's kernels need
        assert cu_seqlens is None or cu_seqlens.dtype == torch.long
        o, final = ops.gsa(q.float(), k.float(), v.float(), s.float(), g, scale=scale, initial_state=initial_state,
                           output_final_state=True, cu_seqlens=cu_seqlens, backend="torch")
        return o.to(q.dtype), (final if output_final_state else (None, None))
    return fn


def _norm_gated(name, norm):
    def fn(x, g, weight, bias, activation="swish", residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6):
        CALLS.append(f"{name}:{activation}")
        assert g.dtype == x.dtype  # fla returns the gate's gradient in x's dtype
        from linear_moe.ops.norm_gate import norm_gate_torch
        return norm_gate_torch(x, g, weight, bias, norm=norm, activation=activation, eps=eps)
    return fn


@pytest.fixture
def fake_fla(monkeypatch):
    mods = {}
    for name in ["fla", "fla.ops", "fla.ops.common", "fla.ops.common.chunk_o", "fla.backends",
                 "fla.ops.simple_gla", "fla.ops.gla", "fla.ops.rwkv6", "fla.ops.delta_rule",
                 "fla.ops.gated_delta_rule", "fla.ops.gsa", "fla.modules", "fla.modules.causal_conv1d",
                 "fla.modules.norm", "fla.modules.norm.fused_norm_gate"]:
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])
    mods["fla.backends"].BaseBackend = object
    mods["fla.backends"].register = lambda op: (lambda cls: REGISTERED.append(cls) or cls)
    for mod, names in {"fla.ops.simple_gla": ["chunk_simple_gla", "fused_recurrent_simple_gla"],
                       "fla.ops.gla": ["chunk_gla", "fused_recurrent_gla"]}.items():
        for n in names:
            setattr(mods[mod], n, _gla(n))
    mods["fla.ops.rwkv6"].chunk_rwkv6 = _rwkv6("chunk_rwkv6")
    mods["fla.ops.rwkv6"].fused_recurrent_rwkv6 = _rwkv6("fused_recurrent_rwkv6")
    mods["fla.ops.delta_rule"].chunk_delta_rule = _delta("chunk_delta_rule", False)
    mods["fla.ops.delta_rule"].fused_recurrent_delta_rule = _delta("fused_recurrent_delta_rule", False)
    mods["fla.ops.gated_delta_rule"].chunk_gated_delta_rule = _delta("chunk_gated_delta_rule", True)
    mods["fla.ops.gated_delta_rule"].fused_recurrent_gated_delta_rule = _delta(
        "fused_recurrent_gated_delta_rule", True)
    mods["fla.modules.causal_conv1d"].causal_conv1d = _causal_conv1d
    mods["fla.ops.gsa"].chunk_gsa = _gsa("chunk_gsa")
    mods["fla.modules.norm.fused_norm_gate"].rms_norm_gated = _norm_gated("rms_norm_gated", "rmsnorm")
    mods["fla.modules.norm.fused_norm_gate"].layer_norm_gated = _norm_gated("layer_norm_gated", "groupnorm")
    mods["fla.ops.gsa"].fused_recurrent_gsa = _gsa("fused_recurrent_gsa")
    # our Triton kernel module is only registered with the (fake) dispatch, never run here
    monkeypatch.setitem(sys.modules, "linear_moe.ops.backends.triton", types.ModuleType("t"))
    monkeypatch.setitem(sys.modules, "linear_moe.ops.backends.triton.dqkwg",
                        types.SimpleNamespace(chunk_bwd_dqkwg=None))
    sys.modules.pop("linear_moe.ops.backends.fla", None)
    import linear_moe.ops.backends.fla as wrapper
    CALLS.clear()
    yield wrapper
    sys.modules.pop("linear_moe.ops.backends.fla", None)


def _gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


@pytest.mark.parametrize("decay,bonus,normalize,mode,expected", [
    ("none", False, False, "chunk", "chunk_simple_gla"),
    ("none", False, True, "chunk", "chunk_simple_gla"),
    ("constant", False, False, "chunk", "chunk_simple_gla"),
    ("scalar", False, False, "recurrent", "fused_recurrent_simple_gla"),
    ("vector", False, False, "chunk", "chunk_gla"),
    ("vector", False, False, "recurrent", "fused_recurrent_gla"),
    ("vector", True, False, "chunk", "chunk_gla"),  # RWKV6: the shifted-query route by default
    ("scalar", True, False, "chunk", "chunk_gla"),
])
def test_gla_mapping(fake_fla, decay, bonus, normalize, mode, expected):
    g = _gen()
    B, T, H, K, V = 2, 13, 2, 8, 4
    q, k, v = (torch.randn(B, T, H, d, generator=g) for d in (K, K, V))
    if normalize:
        q, k = F.elu(q) + 1, F.elu(k) + 1
    ld = {"none": None, "constant": -torch.rand(H, generator=g),
          "scalar": F.logsigmoid(torch.randn(B, T, H, generator=g)),
          "vector": F.logsigmoid(torch.randn(B, T, H, K, generator=g))}[decay]
    u = torch.randn(H, K, generator=g) if bonus else None
    h0 = torch.randn(B, H, K, V + int(normalize), generator=g)
    kw = dict(bonus=u, normalize=normalize, initial_state=h0, output_final_state=True, mode=mode)
    o, s = fake_fla.gla(q, k, v, ld, **kw)
    assert CALLS == [expected]
    o_ref, s_ref = ops.gla(q, k, v, ld, backend="torch", **kw)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-5)


def test_normalize_in_bf16_pads_the_value_width_even(fake_fla, monkeypatch):
    """fla's 16-bit backward needs an even value width: V = 4 plus the ones column is padded to 6, and the pad
    leaves the output and the returned state (V + 1 columns) as they were."""
    g = _gen()
    B, T, H, K, V = 2, 13, 2, 8, 4
    q, k = (F.elu(torch.randn(B, T, H, K, generator=g)) + 1 for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g)
    h0 = torch.rand(B, H, K, V + 1, generator=g)
    widths, inner = [], sys.modules["fla.ops.simple_gla"].chunk_simple_gla
    monkeypatch.setattr(sys.modules["fla.ops.simple_gla"], "chunk_simple_gla",
                        lambda q, k, v, **kw: widths.append((v.shape[-1], kw["initial_state"].shape[-1])) or inner(
                            q.float(), k.float(), v.float(), **kw))
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    o, s = fake_fla.gla(q, k, v, None, normalize=True, initial_state=h0, output_final_state=True, mode="chunk")
    assert widths == [(V + 2, V + 2)]
    # the reference from the same (bf16-rounded) inputs: only the output's final rounding differs
    o_ref, s_ref = ops.gla(q.float(), k.float(), v.float(), None, normalize=True, initial_state=h0,
                           output_final_state=True, backend="torch")
    assert o.dtype == torch.bfloat16 and s.shape == (B, H, K, V + 1)
    torch.testing.assert_close(o.float(), o_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decay,bonus,fn", [("none", False, "fla.ops.simple_gla:chunk_simple_gla"),
                                             ("vector", False, "fla.ops.gla:chunk_gla"),
                                             ("scalar", True, "fla.ops.rwkv6:chunk_rwkv6"),
                                             ("scalar", True, "fla.ops.gla:chunk_gla")])
def test_bf16_odd_key_width_and_mixed_dtypes(fake_fla, monkeypatch, decay, bonus, fn):
    """fla's 16-bit kernels take one dtype and even key and value widths: fp32 keys/values beside bf16 queries (HGRN2
    under autocast) are cast; an odd K (Based's 153 features) gets a zero feature, in the decay, bonus and state too,
    an odd V (GSA's 1) a zero column, both dropped again from the output and the returned state; output and state
    equal the reference on the same rounded inputs."""
    g = _gen()
    B, T, H, K, V = 2, 13, 2, 5, 1  # GSA's slot pass has V = 1
    q = torch.randn(B, T, H, K, generator=g).bfloat16()
    k, v = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, V, generator=g)  # fp32
    ld = {"none": None, "scalar": F.logsigmoid(torch.randn(B, T, H, generator=g)),
          "vector": F.logsigmoid(torch.randn(B, T, H, K, generator=g))}[decay]
    u = torch.randn(H, K, generator=g) if bonus else None
    h0 = torch.randn(B, H, K, V, generator=g)
    mod, name = fn.split(":")
    if bonus:  # RWKV6 on either route
        monkeypatch.setenv("LINEAR_MOE_RWKV6_CHUNK", "chunk_rwkv6" if name == "chunk_rwkv6" else "chunk_gla_shifted_q")
    seen, inner = [], getattr(sys.modules[mod], name)

    def strict(q, k, v, *args, **kw):
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1], kw["initial_state"].shape[-2], kw["initial_state"].shape[-1])
                    + tuple(a.shape[-1] for a in args))
        return inner(q.float(), k.float(), v.float(), *(a.float() for a in args), **kw)
    monkeypatch.setattr(sys.modules[mod], name, strict)
    kw = dict(bonus=u, initial_state=h0, output_final_state=True)
    o, s = fake_fla.gla(q, k, v, ld, mode="chunk", **kw)
    # the decay (and chunk_rwkv6's bonus) padded to K + 1 too; the shifted route adds its bonus outside chunk_gla
    widths = {"none": (6, 6, 2, 6, 2), "vector": (6, 6, 2, 6, 2, 6),
              "scalar": (6, 6, 2, 6, 2, 6) + ((6,) if name == "chunk_rwkv6" else ())}[decay]
    assert seen == [widths]
    o_ref, s_ref = ops.gla(q.float(), k.bfloat16().float(), v.bfloat16().float(), ld,
                           backend="torch", **kw)
    assert o.dtype == torch.bfloat16 and s.shape == (B, H, K, V)
    torch.testing.assert_close(o.float(), o_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)


def _gla_ref_one_by_one(cu_seqlens):
    """The float64 reference run on each sequence of ``cu_seqlens`` alone (from its own initial state)."""
    def fn(initial_state=None, **args):
        parts = [reference.gla_ref(**time_slice(args, lo, hi),
                                   initial_state=None if initial_state is None else initial_state[n:n + 1])
                 for n, (lo, hi) in enumerate(zip(cu_seqlens.tolist(), cu_seqlens[1:].tolist()))]
        return torch.cat([o for o, _ in parts], 1), torch.cat([s for _, s in parts], 0)
    return fn


@pytest.mark.parametrize("cu", [None, [0, 5, 17, 30], [0, 0, 7, 7, 30]], ids=["dense", "varlen", "empty"])
@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("decay", ["none", "constant", "scalar", "vector"])
@pytest.mark.parametrize("route", ["chunk_rwkv6", "chunk_gla_shifted_q", "chunk_gla_shifted_q+kernel"])
def test_rwkv6_chunk_matches_reference_with_gradients(fake_fla, monkeypatch, route, decay, with_state, cu):
    """RWKV6 (`bonus`) in chunk mode, on either route (chunk_rwkv6, or chunk_gla with the queries one token
    early, its shift back and bonus in torch or in our Triton kernel, which CUDA tensors take; here through
    Triton's interpreter): every decay shape; output, final state and the gradients of every input equal the
    float64 reference, dense and packed (uneven and empty sequences: the shift must not cross a boundary)."""
    route, _, kernel = route.partition("+")
    if kernel:
        if rwkv6_bonus is None:
            pytest.skip("needs Triton")
        monkeypatch.setattr(fake_fla, "_bonus_kernel", lambda q: rwkv6_bonus)
    monkeypatch.setenv("LINEAR_MOE_RWKV6_CHUNK", route)
    g = _gen()
    B, T, H, K, V = (2, 30, 2, 8, 6) if cu is None else (1, 30, 2, 8, 6)
    args = gla_inputs(decay, g, B=B, T=T, H=H, K=K, V=V, with_state=False)
    args["bonus"] = randn(g, H, K)
    N = B if cu is None else len(cu) - 1
    if with_state:
        args["initial_state"] = randn(g, N, H, K, V)
    cu = None if cu is None else torch.tensor(cu)
    weights = [randn(g, B, T, H, V).double(), randn(g, N, H, K, V).double()]

    def wrapper(**a):
        return fake_fla.gla(**a, output_final_state=True, cu_seqlens=cu, mode="chunk")

    actual = grads_of(wrapper, args, weights)
    assert CALLS == [route.replace("_shifted_q", "")]
    expected = grads_of(reference.gla_ref if cu is None else _gla_ref_one_by_one(cu), args, weights)
    names = {"q", "k", "v", "bonus"} | ({"log_decay"} if decay != "none" else set()) | (
        {"initial_state"} if with_state else set())
    assert_close_with_grads(actual, expected, 1e-4, f"decay={decay}", names=names)


@pytest.mark.skipif(rwkv6_bonus is None, reason="needs Triton")
def test_rwkv6_kernel_route_with_only_the_final_state_in_the_loss(fake_fla, monkeypatch):
    """When the output takes no gradient the bonus's backward never runs: the route's input tap hands on
    chunk_gla's gradients alone (the early query's rolled back), equal to the reference's."""
    monkeypatch.setattr(fake_fla, "_bonus_kernel", lambda q: rwkv6_bonus)
    monkeypatch.setenv("LINEAR_MOE_RWKV6_CHUNK", "chunk_gla_shifted_q")
    g = _gen()
    args = gla_inputs("vector", g, B=2, T=20, H=2, K=8, V=6, with_state=False)
    args["bonus"] = randn(g, 2, 8)
    w = randn(g, 2, 2, 8, 6).double()
    leaves = {n: t.detach().clone().requires_grad_() for n, t in args.items()}
    _, s = fake_fla.gla(**leaves, output_final_state=True, mode="chunk")
    got = torch.autograd.grad((s.double() * w).sum(), [leaves[n] for n in ("q", "k", "v", "log_decay")])
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in args.items()}
    _, s_ref = reference.gla_ref(**ref_leaves)
    want = torch.autograd.grad((s_ref * w).sum(), [ref_leaves[n] for n in ("q", "k", "v", "log_decay")],
                               allow_unused=True)
    for name, a, b in zip(("q", "k", "v", "log_decay"), got, want):
        b = torch.zeros_like(a, dtype=torch.float64) if b is None else b  # the state never reads q
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)


def test_rwkv6_route_must_be_known(fake_fla, monkeypatch):
    monkeypatch.setenv("LINEAR_MOE_RWKV6_CHUNK", "chunk_magic")
    args = gla_inputs("vector_bonus", _gen(), B=1, T=9, with_state=False)
    with pytest.raises(ValueError, match="LINEAR_MOE_RWKV6_CHUNK='chunk_magic' is unknown; allowed: "
                                         "chunk_gla_shifted_q, chunk_rwkv6"):
        fake_fla.gla(**args, mode="chunk")


def test_rwkv6_default_route_is_the_shifted_query_one(fake_fla, monkeypatch):
    """Without LINEAR_MOE_RWKV6_CHUNK RWKV6 runs on chunk_gla (the faster route on the H100 at 2K, 8K and 32K)."""
    monkeypatch.delenv("LINEAR_MOE_RWKV6_CHUNK", raising=False)
    args = gla_inputs("vector_bonus", _gen(), B=1, T=9, with_state=False)
    fake_fla.gla(**args, mode="chunk")
    assert CALLS == ["chunk_gla"]


@pytest.mark.parametrize("route", ["chunk_gla_shifted_q", "chunk_rwkv6"])
def test_rwkv6_chunk_without_final_state(fake_fla, monkeypatch, route):
    monkeypatch.setenv("LINEAR_MOE_RWKV6_CHUNK", route)
    g = _gen()
    args = gla_inputs("vector_bonus", g, B=1, T=9, with_state=False)
    o, s = fake_fla.gla(**args, mode="chunk")
    assert s is None and CALLS == [route.replace("_shifted_q", "")]
    o_ref, _ = reference.gla_ref(**args)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gated,mode,expected", [
    (False, "chunk", "chunk_delta_rule"), (True, "chunk", "chunk_gated_delta_rule"),
    (False, "recurrent", "fused_recurrent_delta_rule"),
    (True, "recurrent", "fused_recurrent_gated_delta_rule")])
def test_delta_rule_mapping(fake_fla, gated, mode, expected):
    g = _gen()
    B, T, H, K, V = 1, 11, 2, 8, 4
    q, v = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, V, generator=g)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    beta = torch.rand(B, T, H, generator=g)
    ld = F.logsigmoid(torch.randn(B, T, H, generator=g)) if gated else None
    cu = torch.tensor([0, 4, 11])
    h0 = torch.randn(2, H, K, V, generator=g)
    kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu, mode=mode)
    o, s = fake_fla.delta_rule(q, k, v, beta, ld, **kw)
    assert CALLS == [expected]
    o_ref, s_ref = ops.delta_rule(q, k, v, beta, ld, backend="torch", **kw)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-5)


def test_short_conv_state_conversion(fake_fla):
    g = _gen()
    x, w, b = torch.randn(2, 9, 6, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    h0 = torch.randn(2, 6, 3, generator=g)
    y, s = fake_fla.short_conv(x, w, b, initial_state=h0, output_final_state=True)
    assert CALLS == ["causal_conv1d"] and s.shape == (2, 6, 3) and not torch.isnan(s).any()
    y_ref, s_ref = ops.short_conv(x, w, b, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, s_ref)


def test_cu_seqlens_needs_batch_one(fake_fla):
    q = torch.randn(2, 4, 1, 8)
    with pytest.raises(ValueError, match="cu_seqlens needs batch size 1"):
        fake_fla.gla(q, q, q, cu_seqlens=torch.tensor([0, 4]))


def test_dqkwg_fix_takes_gated_calls_only(fake_fla):
    """Our chunk_bwd_dqkwg serves the gated step (fla #640) and declines ungated calls, which keep fla's
    own kernel (measured faster for linear attention, retention and DeltaNet on the H100)."""
    REGISTERED.clear()
    fake_fla.install_dqkwg_fix(torch.device("cpu"))
    (backend_cls,) = REGISTERED
    verify = backend_cls().chunk_bwd_dqkwg_verifier
    t = torch.zeros(1)
    assert verify(t, t, t, t, t, t, None, t)[0] is True             # g positional
    assert verify(t, t, t, t, t, t, g=t, g_gamma=None)[0] is True   # g by keyword
    ok, reason = verify(t, t, t, t, t, t, None, None, t)            # g_gamma only (retention)
    assert ok is False and "ungated" in reason
    assert verify(t, t, t, t, t, t)[0] is False


@pytest.mark.skipif(rwkv6_bonus is None, reason="needs Triton")
def test_shift_and_bonus_kernel_in_bf16():
    """The kernel on bf16 tensors (the GPU's case; fp32 math inside) against the torch form on the same rounded
    inputs, gradients included; two batch rows, a sequence starting mid-row, a ragged key width of 20."""
    g = _gen()
    B, T, H, K, V = 2, 37, 3, 20, 16
    o_early, v = (torch.randn(B, T, H, V, generator=g).bfloat16() for _ in range(2))
    q, k = (torch.randn(B, T, H, K, generator=g).bfloat16() for _ in range(2))
    u = torch.randn(H, K, generator=g)
    first = torch.zeros(T, dtype=torch.bool)
    first[[0, 11]] = True
    leaves = [t.requires_grad_() for t in (o_early, q, k, v, u)]
    out = rwkv6_bonus.shift_and_bonus(o_early, q, k, v, u, first.repeat(B), 0.3)
    do = torch.randn(out.shape, generator=g).bfloat16()
    grads = torch.autograd.grad(out, leaves, do)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    o_ref = torch.roll(ref_leaves[0], 1, dims=1).masked_fill(first.view(1, T, 1, 1), 0) + 0.3 * (
        (ref_leaves[1] * ref_leaves[4] * ref_leaves[2]).sum(-1, keepdim=True) * ref_leaves[3])
    ref_grads = torch.autograd.grad(o_ref, ref_leaves, do.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), o_ref, rtol=1e-2, atol=2e-2)
    for name, a, b in zip(["o_early", "q", "k", "v", "u"], grads, ref_grads):
        torch.testing.assert_close(a.float(), b, rtol=1e-2, atol=3e-2, msg=name)


def test_shift_and_bonus_kernel_refuses_bad_shapes():
    if rwkv6_bonus is None:
        pytest.skip("needs Triton")
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="first has 3 entries, want B\\*T = 4"):
        rwkv6_bonus.shift_and_bonus(torch.zeros(1, 4, 2, 6), q, q, torch.zeros(1, 4, 2, 6), torch.zeros(2, 8),
                                    torch.zeros(3, dtype=torch.bool), 1.0)


@pytest.mark.parametrize("mode,T,packed,expected", [("chunk", 13, False, "chunk_gsa"), ("auto", 1, False, "fused_recurrent_gsa"),
                                                  ("chunk", 13, True, "chunk_gsa")])
def test_gsa_goes_to_fla_chunk_gsa(fake_fla, monkeypatch, mode, T, packed, expected):
    """``ops.gsa`` hands a call the backend rule gives to fla to ``chunk_gsa`` (one token: ``fused_recurrent_gsa``)
    with one 16-bit dtype for q, k, v, s, the gate in fp32 and fla's state pair (ours), and returns what the torch
    form returns on the same rounded inputs."""
    from linear_moe.ops import backends
    monkeypatch.setattr(backends, "resolve_backend", lambda op, backend=None, device="cpu", dtype=None, **f: (
        "fla" if op == "gsa" and backend != "torch" else "torch"))
    g = _gen()
    B, H, K, V, M = (1, 2, 8, 6, 4) if packed else (2, 2, 8, 6, 4)
    cu = torch.tensor([0, 5, 13], dtype=torch.int32) if packed else None
    N = 2
    q = torch.randn(B, T, H, K, generator=g).bfloat16()
    k, v = torch.randn(B, T, H, K, generator=g).bfloat16(), torch.randn(B, T, H, V, generator=g).bfloat16()
    log_decay = F.logsigmoid(torch.randn(B, T, H, M, generator=g))  # fp32, as the layer makes it
    s = -torch.expm1(log_decay)
    state = (torch.randn(N, H, K, M, generator=g), torch.randn(N, H, M, V, generator=g))
    kw = dict(scale=1.0, initial_state=state, output_final_state=True, cu_seqlens=cu)
    o, (hk, hv) = ops.gsa(q, k, v, s, log_decay, mode=mode, **kw)
    assert CALLS == [expected]
    assert o.dtype == torch.bfloat16 and hk.dtype == hv.dtype == torch.float32
    o_ref, (hk_ref, hv_ref) = ops.gsa(q.float(), k.float(), v.float(), s.bfloat16().float(), log_decay,
                                      backend="torch", **kw)
    torch.testing.assert_close(o.float(), o_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(hk, hk_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hv, hv_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gated,mode,expected", [(True, "chunk", "chunk_gated_delta_rule+l2norm"),
                                                 (False, "chunk", "chunk_delta_rule+l2norm"),
                                                 (True, "recurrent", "fused_recurrent_gated_delta_rule+l2norm")])
def test_delta_rule_l2norm_goes_into_fla_kernel(fake_fla, monkeypatch, gated, mode, expected):
    """``ops.delta_rule(..., qk_l2norm=True)`` on the fla backend hands fla the raw q and k with
    ``use_qk_l2norm_in_kernel``, and returns what the torch form returns."""
    from linear_moe.ops import backends
    monkeypatch.setattr(backends, "resolve_backend", lambda op, backend=None, device="cpu", dtype=None, **f: (
        "torch" if backend == "torch" else "fla"))
    SEEN_QK.clear()
    g = _gen()
    B, T, H, K, V = 2, 13, 2, 8, 4
    q, k = torch.randn(B, T, H, K, generator=g) * 3, torch.randn(B, T, H, K, generator=g) * 3
    v, beta = torch.randn(B, T, H, V, generator=g), torch.rand(B, T, H, generator=g)
    ld = F.logsigmoid(torch.randn(B, T, H, generator=g)) if gated else None
    kw = dict(initial_state=torch.randn(B, H, K, V, generator=g), output_final_state=True, mode=mode, qk_l2norm=True)
    o, s = ops.delta_rule(q, k, v, beta, ld, **kw)
    assert CALLS == [expected]
    (seen_q, seen_k), = SEEN_QK
    assert torch.equal(seen_q, q) and torch.equal(seen_k, k)  # not normalised before the kernel
    o_ref, s_ref = ops.delta_rule(q, k, v, beta, ld, backend="torch", **kw)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm,activation,expected", [("rmsnorm", "swish", "rms_norm_gated:swish"),
                                                      ("rmsnorm", "silu", "rms_norm_gated:swish"),
                                                      ("groupnorm", "sigmoid", "layer_norm_gated:sigmoid")])
def test_norm_gate_goes_to_fla_fused_kernel(fake_fla, monkeypatch, norm, activation, expected):
    """``ops.norm_gate`` hands a combination fla's gated norm covers to it (the gate in x's dtype, silu as swish) and
    returns what PyTorch returns; the layer's OutputNormGate goes the same way."""
    from linear_moe.layers.common import OutputNormGate
    from linear_moe.ops import backends
    monkeypatch.setattr(backends, "resolve_backend", lambda op, backend=None, device="cpu", dtype=None, **f: (
        "torch" if backend == "torch" else "fla"))
    g = _gen()
    x, gate = torch.randn(2, 7, 3, 8, generator=g).bfloat16(), torch.randn(2, 7, 3, 8, generator=g)  # fp32 gate
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    bias = b if norm == "groupnorm" else None
    y = ops.norm_gate(x, gate, w, bias, norm=norm, activation=activation)
    assert CALLS == [expected] and y.dtype == torch.bfloat16
    want = ops.norm_gate(x, gate.bfloat16(), w, bias, norm=norm, activation=activation, backend="torch")
    torch.testing.assert_close(y, want)
    CALLS.clear()
    layer = OutputNormGate(8, norm=norm, gate_fn=activation)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(b)
    torch.testing.assert_close(layer(x, gate.reshape(2, 7, 24)), want)
    assert CALLS == [expected]


def test_fla_wrapper_hands_fla_one_int64_copy(fake_fla):
    """The packer's int32 cu_seqlens becomes one int64 tensor, reused while the source tensor is the same: fla memoises
    its host-side chunk indices by that tensor's identity, so every layer after the first hits its cache."""
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    first = fake_fla._long_cu(cu)
    assert first.dtype == torch.int64 and first.tolist() == [0, 5, 9]
    assert fake_fla._long_cu(cu) is first and fake_fla._prepare(torch.zeros(1, 9, 1, 4), None, cu)[1] is first
    other = torch.tensor([0, 5, 9], dtype=torch.int32)
    assert fake_fla._long_cu(other) is not first
    cu64 = torch.tensor([0, 9])
    assert fake_fla._long_cu(cu64) is cu64 and fake_fla._long_cu(None) is None
    cu[1] = 4  # changed in place: a fresh copy
    assert fake_fla._long_cu(cu).tolist() == [0, 4, 9]
