"""Grouped expert GEMMs: torch._grouped_mm path and the loop fallback against a plain per-group matmul."""
import pytest
import torch

from linear_moe.moe import GroupedExperts, SwiGLUMLP, grouped_linear
from linear_moe.moe.experts import _grouped_mm_runs
from linear_moe.moe.permute import inverse_order

HAS_CPU_GROUPED = _grouped_mm_runs(torch.device("cpu"), torch.float32)


def _reference(x, w, counts):
    out, start = [], 0
    for g, n in enumerate(counts.tolist()):
        out.append(x[start:start + n].double() @ w[g].double().T)
        start += n
    return torch.cat(out)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", ["auto", "loop", "grouped_mm"])
def test_grouped_linear_matches_per_group_matmul(backend):
    if backend == "grouped_mm" and not HAS_CPU_GROUPED:
        pytest.skip("torch._grouped_mm does not run on this CPU build")
    counts = torch.tensor([3, 0, 5, 1, 0, 7])  # empty groups included
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    w = torch.randn(6, 24, 16, requires_grad=True)
    y = grouped_linear(x, w, counts, backend)
    ref = _reference(x, w, counts)
    assert _rel(y, ref) < 1e-5
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    rgx, rgw = torch.autograd.grad(ref, (x, w), g.double())
    assert _rel(gx, rgx) < 1e-5 and _rel(gw, rgw) < 1e-5


def test_grouped_experts_survive_expanded_gradients():
    # y.sum().backward() hands _grouped_mm a stride-0 gradient, which its backward rejects unless fixed up.
    ex = GroupedExperts(4, 16, 8)
    counts = torch.tensor([2, 3, 0, 3])
    x = torch.randn(8, 16, requires_grad=True)
    ex(x, counts).sum().backward()
    assert x.grad is not None and torch.isfinite(ex.down_proj.grad).all()


def test_fallbacks_for_float64_and_unaligned_shapes():
    counts = torch.tensor([2, 2])
    x = torch.randn(4, 5, dtype=torch.float64)           # float64: _grouped_mm has no kernel
    w = torch.randn(2, 3, 5, dtype=torch.float64)
    assert _rel(grouped_linear(x, w, counts), _reference(x, w, counts)) < 1e-12
    x32, w32 = x.float(), w.float()                       # 5 * 4 bytes: rows not 16-byte aligned
    assert _rel(grouped_linear(x32, w32, counts, "auto"), _reference(x32, w32, counts)) < 1e-5
    if HAS_CPU_GROUPED:
        with pytest.raises(ValueError, match="16-byte"):
            grouped_linear(x32, w32, counts, "grouped_mm")
    with pytest.raises(ValueError, match="backend"):
        grouped_linear(x32, w32, counts, "cutlass")


def test_no_tokens_keeps_the_graph():
    ex = GroupedExperts(2, 8, 8)
    y = ex(torch.randn(0, 8), torch.zeros(2, dtype=torch.long))
    assert y.shape == (0, 8)
    y.sum().backward()
    assert torch.equal(ex.gate_up_proj.grad, torch.zeros_like(ex.gate_up_proj))


def test_grouped_experts_match_swiglu_per_expert():
    ex = GroupedExperts(3, 8, 12)
    counts = torch.tensor([4, 1, 3])
    x = torch.randn(8, 8)
    y = ex(x, counts)
    start = 0
    for e, n in enumerate(counts.tolist()):
        mlp = SwiGLUMLP(8, 12)
        with torch.no_grad():
            mlp.gate_proj.weight.copy_(ex.gate_proj[e])
            mlp.up_proj.weight.copy_(ex.up_proj[e])
            mlp.down_proj.weight.copy_(ex.down_proj[e])
        torch.testing.assert_close(y[start:start + n], mlp(x[start:start + n]), rtol=1e-5, atol=1e-6)
        start += n


def test_shard_keeps_the_right_slice():
    ex = GroupedExperts(8, 8, 4)
    part = ex.shard(2, 4)
    assert part.num_experts == 2 and torch.equal(part.up_proj, ex.up_proj[4:6])
    with pytest.raises(ValueError, match="not divisible"):
        ex.shard(0, 3)


def test_swiglu_mlp_definition():
    mlp = SwiGLUMLP(8, 20)
    x = torch.randn(2, 3, 8)
    want = (torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), want)
    with pytest.raises(ValueError, match="intermediate_size=0"):
        SwiGLUMLP(8, 0)


def test_autocast_runs_the_experts_in_the_autocast_dtype():
    """fp32 master weights under bf16 autocast: the experts compute in bf16 (the grouped path), like nn.Linear."""

    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 32)
    x = torch.randn(10, 16)
    counts = torch.tensor([3, 0, 5, 2])
    ref = experts(x, counts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, counts)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert experts.gate_up_proj.grad.dtype == torch.float32 and torch.isfinite(experts.gate_up_proj.grad).all()


@pytest.mark.skipif(not HAS_CPU_GROUPED, reason="torch._grouped_mm does not run on this CPU build")
def test_fused_grouped_experts_match_the_loop_in_every_gradient():
    """The one-node grouped path (recomputes the SwiGLU output in backward) against the differentiable
    per-expert loop, with empty experts and per-row routing weights."""
    grouped = GroupedExperts(5, 16, 8)
    loop = GroupedExperts(5, 16, 8, backend="loop")
    loop.load_state_dict(grouped.state_dict())
    counts = torch.tensor([3, 0, 6, 0, 4])
    x = torch.randn(13, 16, requires_grad=True)
    w = torch.rand(13, requires_grad=True)
    g = torch.randn(13, 16)
    results = []
    for ex in (grouped, loop):
        y = ex(x, counts, w)
        results.append((y, *torch.autograd.grad((y * g).sum(), (x, w, *ex.parameters()))))
    for a, b in zip(*results):
        assert _rel(a, b) < 1e-5
    assert torch.equal(results[0][-2][1], torch.zeros(16, 16))  # an expert without rows gets a zero gradient


@pytest.mark.skipif(not HAS_CPU_GROUPED, reason="torch._grouped_mm does not run on this CPU build")
def test_grouped_experts_keep_only_x_and_gate_up_for_backward():
    ex = GroupedExperts(4, 16, 12, recompute=True)
    x = torch.randn(10, 16, requires_grad=True)
    w = torch.rand(10, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ex(x, torch.tensor([4, 0, 5, 1]), w)
    activations = [t for t in saved if t.dim() == 2]
    # x [10, 16] and gate|up [10, 2 * 12]: not the SwiGLU output, not the down projection's output
    assert sorted(tuple(t.shape) for t in activations) == [(10, 16), (10, 24)]
    weights = sorted(tuple(t.shape) for t in saved if t.dim() == 3)
    assert weights == [(4, 16, 12), (4, 24, 16)]  # down_proj itself, gate and up stacked


def _routing(n_tokens, k, num_experts, drop, gen):
    """A random top-k routing in the layer's form: (counts [E], token [n], slot_to_row [N, k]); ``drop``
    slots are left out, as capacity dropping would."""
    slot_expert = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(n_tokens)]).reshape(-1)
    kept = torch.randperm(n_tokens * k, generator=gen)[drop:]
    order = kept[torch.argsort(slot_expert[kept], stable=True)]
    counts = torch.bincount(slot_expert[order], minlength=num_experts)
    return counts, order // k, inverse_order(order, n_tokens * k).view(n_tokens, k)


def _experts_and_loop(num_experts, hidden, inter, dtype=torch.float32):
    grouped = GroupedExperts(num_experts, hidden, inter).to(dtype)
    loop = GroupedExperts(num_experts, hidden, inter, backend="loop").to(dtype)
    loop.load_state_dict(grouped.state_dict())
    return grouped, loop


def _run(ex, x, counts, w, g, token=None, slot_to_row=None, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = ex(x, counts, w, token, slot_to_row)
    dx, dw, d_gate_up, d_down = torch.autograd.grad((y.float() * g).sum(), (x, w, ex.gate_up_proj, ex.down_proj))
    h = ex.intermediate_size
    return y, dx, dw, d_gate_up[:, :h], d_gate_up[:, h:], d_down


@pytest.mark.skipif(not HAS_CPU_GROUPED, reason="torch._grouped_mm does not run on this CPU build")
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("cast_once,recompute", [(False, True), (True, True), (False, False)])
def test_stacked_gate_up_matches_the_loop_in_output_and_every_gradient(gather, cast_once, recompute):
    """One GEMM for gate and up each way (stacked weight, one [n, 2H] output and gradient) against the loop,
    which runs gate and up apart; with ``token`` the rows are gathered from the tokens, some slots dropped,
    and the input gradient is summed per token. ``cast_once``: the stacked fp32 weight comes from the cache;
    ``recompute=False``: backward reads the rows and SwiGLU output kept from forward."""
    gen = torch.Generator().manual_seed(5)
    grouped, loop = _experts_and_loop(6, 16, 12)
    grouped.cast_weights_once, grouped.recompute = cast_once, recompute
    if gather:
        counts, token, slot_to_row = _routing(9, 2, 6, drop=3, gen=gen)
        x = torch.randn(9, 16, generator=gen, requires_grad=True)
    else:
        counts, token, slot_to_row = torch.tensor([3, 0, 6, 0, 4, 2]), None, None
        x = torch.randn(15, 16, generator=gen, requires_grad=True)
    n = int(counts.sum())
    w = torch.rand(n, generator=gen, requires_grad=True)
    g = torch.randn(n, 16, generator=gen)
    got = _run(grouped, x, counts, w, g, token, slot_to_row)
    want = _run(loop, x, counts, w, g, token, slot_to_row)
    for name, a, b in zip(("y", "x", "row_weight", "gate_proj", "up_proj", "down_proj"), got, want):
        assert a.shape == b.shape and _rel(a, b) < 1e-5, name
    if not gather:  # an expert without rows gets a zero gradient
        assert torch.equal(got[3][1], torch.zeros(12, 16)) and torch.equal(got[4][3], torch.zeros(12, 16))


@pytest.mark.skipif(not _grouped_mm_runs(torch.device("cpu"), torch.bfloat16), reason="no CPU bf16 grouped_mm")
@pytest.mark.parametrize("gather", [False, True])
def test_stacked_gate_up_under_autocast_with_and_without_the_cached_cast(gather):
    """fp32 weights under bf16 autocast: the stacked bf16 weight made at every forward, or cached
    (cast_weights_once), gives the same bits; both stay close to the loop; gradients land on gate_proj and
    up_proj in fp32; an in-place change of up_proj alone makes the cache restack."""
    gen = torch.Generator().manual_seed(7)
    grouped, loop = _experts_and_loop(4, 32, 16)
    cached = GroupedExperts(4, 32, 16)
    cached.load_state_dict(grouped.state_dict())
    cached.cast_weights_once = True
    if gather:
        counts, token, slot_to_row = _routing(12, 2, 4, drop=2, gen=gen)
        x = torch.randn(12, 32, generator=gen, requires_grad=True)
    else:
        counts, token, slot_to_row = torch.tensor([5, 0, 7, 4]), None, None
        x = torch.randn(16, 32, generator=gen, requires_grad=True)
    n = int(counts.sum())
    w = torch.rand(n, generator=gen, requires_grad=True)
    g = torch.randn(n, 32, generator=gen)
    fresh = _run(grouped, x, counts, w, g, token, slot_to_row, autocast=True)
    for _ in range(2):  # the second forward reads the cache
        once = _run(cached, x, counts, w, g, token, slot_to_row, autocast=True)
        for a, b in zip(once, fresh):
            assert a.dtype == b.dtype and torch.equal(a, b)
    _, stacked = cached._cast_cache["gate_up_proj"]
    assert stacked.shape == (4, 32, 32) and stacked.dtype == torch.bfloat16
    assert torch.equal(stacked[:, :16], cached.gate_proj.bfloat16())
    assert torch.equal(stacked[:, 16:], cached.up_proj.bfloat16())
    want = _run(loop, x, counts, w, g, token, slot_to_row, autocast=True)
    assert fresh[0].dtype == torch.bfloat16 and [t.dtype for t in fresh[3:]] == [torch.float32] * 3
    for name, a, b in zip(("y", "x", "row_weight", "gate_proj", "up_proj", "down_proj"), fresh, want):
        assert _rel(a, b) < 2e-2, name
    with torch.no_grad():
        cached.up_proj.mul_(-1)
        grouped.up_proj.mul_(-1)
    assert torch.equal(_run(cached, x, counts, w, g, token, slot_to_row, autocast=True)[0],
                       _run(grouped, x, counts, w, g, token, slot_to_row, autocast=True)[0])
    cached.clear_cast_cache()
    assert cached._cast_cache == {}


@pytest.mark.skipif(not HAS_CPU_GROUPED, reason="torch._grouped_mm does not run on this CPU build")
@pytest.mark.parametrize("gather", [False, True])
def test_no_grad_inference_runs_on_the_stacked_weight_itself(gather, monkeypatch):
    """Without autograd and with the weights in the compute dtype (generation), the grouped GEMMs read the
    ``gate_up_proj`` parameter itself: no copy per call (per decoded token), same output as with autograd."""
    import linear_moe.moe.experts as experts_mod

    gen = torch.Generator().manual_seed(7)
    ex, _ = _experts_and_loop(6, 16, 12)
    if gather:
        counts, token, slot_to_row = _routing(9, 2, 6, drop=2, gen=gen)
        x = torch.randn(9, 16, generator=gen)
    else:
        counts, token, slot_to_row = torch.tensor([3, 0, 6, 0, 4, 2]), None, None
        x = torch.randn(15, 16, generator=gen)
    w = torch.rand(int(counts.sum()), generator=gen)
    trained = ex(x, counts, w, token, slot_to_row)
    weights, real = [], experts_mod._GroupedSwiGLU.apply
    monkeypatch.setattr(experts_mod._GroupedSwiGLU, "apply", lambda *a: weights.append(a[1]) or real(*a))
    with torch.no_grad():
        inferred = ex(x, counts, w, token, slot_to_row)
    assert weights[0] is ex.gate_up_proj and _rel(inferred, trained) < 1e-5


def test_separate_gate_and_up_in_a_state_dict_load_into_the_stacked_weight():
    """Checkpoints written before gate and up were one parameter load unchanged."""
    ex = GroupedExperts(3, 8, 4)
    old = {"gate_proj": torch.randn(3, 4, 8), "up_proj": torch.randn(3, 4, 8), "down_proj": torch.randn(3, 8, 4)}
    ex.load_state_dict(dict(old))
    assert torch.equal(ex.gate_proj, old["gate_proj"]) and torch.equal(ex.up_proj, old["up_proj"])
    assert torch.equal(ex.down_proj, old["down_proj"]) and set(ex.state_dict()) == {"gate_up_proj", "down_proj"}


@pytest.mark.skipif(not _grouped_mm_runs(torch.device("cpu"), torch.bfloat16), reason="no CPU bf16 grouped_mm")
def test_a_bf16_step_copies_no_weight():
    """Weights already in the compute dtype: forward and backward read gate|up and down in place and their
    gradients come out whole (two separate gate / up parameters cost a stacking copy each step and a split
    of the gradient: four weight-sized copies)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.copy_, torch.ops.aten._to_copy, torch.ops.aten.cat,
                                       torch.ops.aten.clone, torch.ops.aten.new_empty_strided):
                self.shapes.append(tuple(out.shape))
            return out

    ex = GroupedExperts(4, 32, 16).bfloat16()
    x = torch.randn(12, 32, dtype=torch.bfloat16, requires_grad=True)
    counts = torch.tensor([5, 0, 4, 3])
    with Copies() as seen:
        ex(x, counts).float().sum().backward()
    weight_shapes = {tuple(p.shape) for p in ex.parameters()} | {(4, 16, 32)}  # the halves too
    assert ex.gate_up_proj.grad is not None and not weight_shapes & set(seen.shapes), seen.shapes
