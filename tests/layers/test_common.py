"""Shared layer pieces (common.py, feature_maps.py) against float64 references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linear_moe.layers import AttentionConfig, MixerConfig
from linear_moe.layers.common import (
    OutputNormGate, RMSNorm, ShortConvolution, ShortConvQKV, choose, grouped_qkv, merge_heads, op_backend,
    op_mode, op_options, op_run_options, qkv_projections, repeat_heads, resolve_dims, short_conv_enabled, split_heads,
)
from linear_moe.layers.feature_maps import FEATURE_MAPS, feature_map
from linear_moe.ops.delta_rule import l2_normalize


def _gen():
    g = torch.Generator().manual_seed(torch.seed() % (2**31))
    return g


def test_rmsnorm_and_l2_norm():
    g = _gen()
    x = torch.randn(2, 3, 8, generator=g)
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g))
    xd = x.double()
    ref = xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), ref, rtol=1e-5, atol=1e-6)
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    ref = xd / (xd.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(l2_normalize(x).double(), ref, rtol=1e-5, atol=1e-6)
    assert l2_normalize(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("norm", ["rmsnorm", "groupnorm", "none"])
@pytest.mark.parametrize("gate_fn", ["swish", "sigmoid"])
def test_output_norm_gate(norm, gate_fn):
    g = _gen()
    B, T, H, D = 2, 3, 2, 4
    o, gate = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, H * D, generator=g)
    mod = OutputNormGate(D, norm=norm, gate_fn=gate_fn)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    od, gd = o.double(), gate.double().view(B, T, H, D)
    if norm == "rmsnorm":
        od = od / (od.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * mod.weight.double()
    elif norm == "groupnorm":
        mu, var = od.mean(-1, keepdim=True), od.var(-1, unbiased=False, keepdim=True)
        od = (od - mu) / (var + 1e-5).sqrt() * mod.weight.double() + mod.bias.double()
    act = gd * torch.sigmoid(gd) if gate_fn == "swish" else torch.sigmoid(gd)
    torch.testing.assert_close(mod(o, gate).double(), od * act, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mod(o, None).double(), od, rtol=1e-5, atol=1e-6)


def test_heads_helpers():
    x = torch.randn(2, 3, 12)
    h = split_heads(x, 3)
    assert h.shape == (2, 3, 3, 4)
    assert torch.equal(merge_heads(h), x)
    r = repeat_heads(h, 2)
    assert r.shape == (2, 3, 6, 4) and torch.equal(r[:, :, 3], h[:, :, 1])


def test_bad_options():
    with pytest.raises(ValueError, match="mode='fast'.*'chunk'"):
        op_mode("fast", "gla")
    with pytest.raises(ValueError, match="backend='cuda'"):
        op_backend("cuda")
    assert op_mode("fused_recurrent") == "recurrent" and op_backend("") is None
    with pytest.raises(ValueError, match="output_norm='layernorm'.*'groupnorm'"):
        OutputNormGate(4, norm="layernorm")
    with pytest.raises(ValueError, match="gate_fn='tanhh'"):
        OutputNormGate(4, gate_fn="tanhh")
    with pytest.raises(ValueError, match="conv_size=7"):
        ShortConvolution(8, 7)
    with pytest.raises(ValueError, match="feature_map='cosine'.*taylor"):
        feature_map("cosine", 4)
    assert choose("a", ["a"], "x") == "a"


def _kernel_ref(name, q, k, fm):
    """φ(q)·φ(k) written from each paper's formula in float64."""
    d = q.shape[-1]
    qk = (q * k).sum(-1)
    if name == "taylor":
        return 1 + qk / d**0.5 + qk**2 / (2 * d)
    if name == "rebased":
        def ln(x):
            return (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        gam, bet = fm.gamma.double(), fm.beta.double()
        return (((gam * ln(q) + bet) * (gam * ln(k) + bet)).sum(-1)) ** 2
    if name == "hedgehog":
        W = fm.weight.double()
        fq, fk = torch.cat([q @ W, -q @ W], -1).softmax(-1), torch.cat([k @ W, -k @ W], -1).softmax(-1)
        return (fq * fk).sum(-1)
    if name == "t2r":
        W, b = fm.weight.double(), fm.bias.double()
        return (F.relu(q @ W + b) * F.relu(k @ W + b)).sum(-1)
    elementwise = {"identity": lambda x: x, "elu": lambda x: F.elu(x) + 1, "relu": F.relu,
                   "swish": F.silu, "silu": F.silu}[name]
    return (elementwise(q) * elementwise(k)).sum(-1)


@pytest.mark.parametrize("name", list(FEATURE_MAPS))
def test_feature_map_kernels(name):
    g = _gen()
    d = 4
    fm = feature_map(name, d)
    with torch.no_grad():
        for p in fm.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    q, k = torch.randn(5, d, generator=g), torch.randn(5, d, generator=g)
    fq, fk = fm(q), fm(k)
    assert fq.shape == (5, fm.out_dim)
    torch.testing.assert_close((fq * fk).sum(-1).double(), _kernel_ref(name, q.double(), k.double(), fm),
                               rtol=1e-4, atol=1e-5)


def test_short_convolution_state_and_packing():
    g = _gen()
    conv = ShortConvolution(6, 3, activation="silu", bias=True)
    x = torch.randn(1, 7, 6, generator=g)
    w, b = conv.weight.detach().double(), conv.bias.detach().double()
    xd = torch.cat([torch.zeros(1, 2, 6, dtype=torch.float64), x.double()], 1)  # two zeros before the start
    ref = torch.stack([(xd[:, t:t + 3] * w.T).sum(1) + b for t in range(7)], 1)
    ref = ref * torch.sigmoid(ref)
    y, state = conv(x)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    assert state.shape == (1, 6, 2) and torch.equal(state, x[0, -2:].T[None])
    y1, s1 = conv(x[:, :4])  # prefix, then continue from its state
    y2, _ = conv(x[:, 4:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    packed, states = conv(x, cu_seqlens=torch.tensor([0, 4, 7]))  # the second document starts from zeros
    torch.testing.assert_close(packed[:, :4], y1)
    torch.testing.assert_close(packed[:, 4:], conv(x[:, 4:])[0])
    assert states.shape == (2, 6, 2)


def test_resolve_dims():
    att = AttentionConfig(num_heads=4)
    assert resolve_dims(32, MixerConfig(), att, "m") == (4, 4, 8, 8)
    assert resolve_dims(32, MixerConfig(num_heads=2, expand_k=0.5, expand_v=2), att, "m") == (2, 2, 8, 32)
    assert resolve_dims(32, MixerConfig(head_dim=3), att, "m", default_head_k_dim=16) == (4, 4, 3, 8)
    assert resolve_dims(32, MixerConfig(), att, "m", default_head_k_dim=16).head_k_dim == 16
    assert resolve_dims(32, MixerConfig(num_kv_heads=2), att, "m", grouped_kv=True) == (4, 2, 8, 8)
    for cfg, kw, match in [(MixerConfig(num_kv_heads=2), {}, "m: num_kv_heads=2 is not supported"),
                           (MixerConfig(num_kv_heads=3), {"grouped_kv": True}, "num_kv_heads=3 must"),
                           (MixerConfig(expand_v=0.3), {}, "m: hidden_size \\* expand_v=9.6"),
                           (MixerConfig(expand_k=0.1), {}, "expand_k"),
                           (MixerConfig(head_dim=-1), {}, "head_dim=-1")]:
        with pytest.raises(ValueError, match=match):
            resolve_dims(32, cfg, att, "m", **kw)


def test_op_options():
    assert op_options(MixerConfig(mode="fused_chunk", backend="torch", chunk_size=16), "m") == ("chunk", "torch", 16)
    with pytest.raises(ValueError, match="m: chunk_size=0"):
        op_options(MixerConfig(chunk_size=0), "m")
    mixer = torch.nn.Module()
    mixer.mode, mixer.chunk_size, mixer.backend = "chunk", 8, None
    assert op_run_options(mixer, 5) == dict(mode="chunk", chunk_size=8, backend=None)
    assert op_run_options(mixer, 1)["mode"] == "recurrent"  # a decoding step


@pytest.mark.parametrize("value,expected", [("auto", "default"), (None, "default"), (True, True), (False, False),
                                            ("true", True), ("False", False), ("AUTO", "default")])
def test_short_conv_enabled(value, expected):
    for default in (True, False):
        want = default if expected == "default" else expected
        assert short_conv_enabled(MixerConfig(use_short_conv=value), default, "m") is want


def test_short_conv_enabled_rejects_other_values():
    for bad in ("yes", 1, "on"):
        with pytest.raises(ValueError, match=f"m: use_short_conv={bad!r} is not supported"):
            short_conv_enabled(MixerConfig(use_short_conv=bad), True, "m")


@pytest.mark.parametrize("container", [None, "convs"])
def test_short_conv_qkv_registers_on_the_owner_and_runs_each_branch(container):
    g = _gen()
    owner = torch.nn.Module()
    convs = ShortConvQKV(owner, {"q": 4, "k": 4, "v": 6}, enabled=True, conv_size=3, activation="silu",
                         container=container, mixer="m")
    names = {n for n, _ in owner.named_parameters()}
    expected = {f"convs.{b}.weight" for b in "qkv"} if container else {f"{b}_conv.weight" for b in "qkv"}
    assert names == expected
    with torch.no_grad():
        for p in owner.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    xs = [torch.randn(2, 5, w, generator=g) for w in (4, 4, 6)]
    state0 = {f"conv_{b}": torch.randn(2, w, 2, generator=g) for b, w in zip("qkv", (4, 4, 6))}
    new_state: dict = {}
    ys = convs(owner, xs, state0, new_state, None)
    for b, x, y in zip("qkv", xs, ys):
        ref, ref_state = convs.conv(owner, b)(x, state0[f"conv_{b}"])
        assert torch.equal(y, ref) and torch.equal(new_state[f"conv_{b}"], ref_state)
    assert set(new_state) == {"conv_q", "conv_k", "conv_v"}


def test_short_conv_qkv_off_registers_nothing_and_applies_the_fallback():
    owner = torch.nn.Module()
    convs = ShortConvQKV(owner, {"q": 4, "f": 4}, enabled=False, conv_size=4, activation=None, fallback=F.silu,
                         container="convs")
    assert list(owner.parameters()) == [] and owner.convs is None
    x = torch.randn(1, 3, 4)
    new_state: dict = {}
    q, f = convs(owner, [x, -x], None, new_state, None)
    assert torch.equal(q, F.silu(x)) and torch.equal(f, F.silu(-x)) and new_state == {}
    plain = ShortConvQKV(torch.nn.Module(), {"q": 4}, enabled=False, conv_size=4, activation=None)
    assert plain(owner, [x], None, new_state, None)[0] is x


def test_grouped_qkv_repeats_key_value_heads_over_query_groups():
    g = _gen()
    mixer = torch.nn.Module()
    mixer.num_heads, mixer.num_kv_heads = 4, 2
    mixer.q_proj, mixer.k_proj, mixer.v_proj = qkv_projections(6, 4 * 3, 2 * 3, 2 * 5)
    assert [p.bias for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj)] == [None] * 3
    x = torch.randn(2, 7, 6, generator=g)
    q, k, v = grouped_qkv(mixer, x, torch.exp)
    assert q.shape == k.shape == (2, 7, 4, 3) and v.shape == (2, 7, 4, 5)
    torch.testing.assert_close(q, torch.exp(x @ mixer.q_proj.weight.T).view(2, 7, 4, 3))
    kv_k = torch.exp(x @ mixer.k_proj.weight.T).view(2, 7, 2, 3)
    kv_v = (x @ mixer.v_proj.weight.T).view(2, 7, 2, 5)
    for h in range(4):  # query head h reads key/value head h // 2
        torch.testing.assert_close(k[:, :, h], kv_k[:, :, h // 2])
        torch.testing.assert_close(v[:, :, h], kv_v[:, :, h // 2])
