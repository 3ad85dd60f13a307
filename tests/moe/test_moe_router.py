"""Routers against the per-token reference, the balance / z losses against direct formulas, and
aux-loss-free bias balancing."""
import math

import pytest
import torch

from linear_moe.moe import MoEConfig, Router, load_balancing_loss, route, router_z_loss
from linear_moe.moe.reference import reference_route

ROUTER_CASES = {
    "mixtral": MoEConfig(num_experts=8, top_k=2, router="softmax", norm_topk_prob=True),
    "qwen2": MoEConfig(num_experts=12, top_k=4, router="softmax", norm_topk_prob=False),
    "deepseek_v2": MoEConfig(num_experts=16, top_k=3, router="deepseek", norm_topk_prob=False, n_group=4,
                             topk_group=2, routed_scaling_factor=2.5),
    "deepseek_plain": MoEConfig(num_experts=8, top_k=2, router="deepseek", norm_topk_prob=True),
    "sigmoid_bias": MoEConfig(num_experts=16, top_k=4, router="sigmoid_bias", norm_topk_prob=True, n_group=4,
                              topk_group=2, routed_scaling_factor=1.5),
}


@pytest.mark.parametrize("name", list(ROUTER_CASES))
def test_router_matches_reference(name):
    cfg = ROUTER_CASES[name]
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    logits = torch.randn(40, cfg.num_experts, generator=g, dtype=torch.float64) * 2
    bias = torch.randn(cfg.num_experts, generator=g, dtype=torch.float64) * 0.3 if cfg.router == "sigmoid_bias" else None
    out = route(logits, cfg, bias)
    assert out.topk_idx.shape == (40, cfg.top_k) and out.probs.shape == (40, cfg.num_experts)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(40), rtol=0, atol=1e-5)
    for t in range(40):
        chosen, weight = reference_route(logits[t], cfg, bias)
        assert out.topk_idx[t].tolist() == chosen
        torch.testing.assert_close(out.topk_weight[t].double(), weight, rtol=1e-5, atol=1e-7)
        if cfg.norm_topk_prob:
            assert math.isclose(out.topk_weight[t].sum().item(), cfg.routed_scaling_factor, rel_tol=1e-5)


def test_group_limited_routing_stays_in_groups():
    cfg = ROUTER_CASES["deepseek_v2"]
    logits = torch.randn(64, cfg.num_experts)
    groups = route(logits, cfg).topk_idx // (cfg.num_experts // cfg.n_group)
    assert all(len(set(row)) <= cfg.topk_group for row in groups.tolist())


def test_sigmoid_bias_only_changes_selection():
    cfg = ROUTER_CASES["sigmoid_bias"]
    logits = torch.randn(32, cfg.num_experts)
    bias = torch.zeros(cfg.num_experts)
    bias[3] = 10.0  # expert 3 always selected, its weight still its own sigmoid score
    out = route(logits, cfg, bias)
    assert (out.topk_idx == 3).any(-1).all()
    raw = torch.sigmoid(logits).gather(1, out.topk_idx)
    torch.testing.assert_close(out.topk_weight, raw / raw.sum(-1, keepdim=True) * cfg.routed_scaling_factor)


@pytest.mark.parametrize("seq_len", [None, 5])
def test_load_balancing_loss_matches_definition(seq_len):
    n, e, k = 20, 6, 2
    probs = torch.softmax(torch.randn(n, e, dtype=torch.float64), -1)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    got = load_balancing_loss(probs, idx, e, seq_len)
    length = seq_len or n
    per_seq = []
    for s in range(n // length):
        rows = range(s * length, (s + 1) * length)
        total = 0.0
        for ex in range(e):
            f = sum(int(ex in idx[t].tolist()) for t in rows) / (length * k)
            p = sum(probs[t, ex].item() for t in rows) / length
            total += f * p
        per_seq.append(e * total)
    assert math.isclose(got.item(), sum(per_seq) / len(per_seq), rel_tol=1e-9)


def test_balance_loss_is_one_when_uniform_and_z_loss_definition():
    e = 4
    idx = torch.tensor([[0, 1], [2, 3]])
    assert math.isclose(load_balancing_loss(torch.full((2, e), 0.25), idx, e).item(), 1.0, rel_tol=1e-6)
    logits = torch.randn(7, e, dtype=torch.float64)
    want = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 7
    assert math.isclose(router_z_loss(logits).item(), want, rel_tol=1e-6)


def test_aux_free_bias_balances_skewed_load():
    # Tokens cluster around one direction the gate strongly prefers for experts 0 and 1: without the
    # bias those two take half the load. Sign steps oscillate around balance, so the load averaged
    # over later steps must be near uniform.
    torch.manual_seed(torch.seed() % 2**31)
    e, c = 8, 16
    cfg = MoEConfig(num_experts=e, top_k=2, router="sigmoid_bias", bias_update_rate=0.01)
    router = Router(c, cfg).train()
    direction = torch.randn(c)
    direction = direction / direction.norm()
    with torch.no_grad():
        router.weight.normal_(std=0.1)
        router.weight[:2] += direction * 2

    def step_load():
        x = torch.randn(256, c) * 0.5 + direction * 2
        return torch.bincount(router(x).topk_idx.reshape(-1), minlength=e).float()

    first = step_load()
    assert first.max() / first.mean() > 2.5  # skewed to begin with
    late = torch.zeros(e)
    for i in range(200):
        router.update_bias()
        load = step_load()
        if i >= 100:
            late += load
    assert late.max() / late.mean() < 1.3 and late.min() / late.mean() > 0.7, late
    assert router.expert_bias[:2].max() < router.expert_bias[2:].min()  # favoured experts pushed down
    assert router.weight.grad is None  # the bias is a buffer, not trained


def test_update_bias_is_noop_for_other_routers_and_zero_rate():
    r = Router(8, MoEConfig(num_experts=4, top_k=1, router="softmax"))
    r.update_bias()
    assert r.expert_bias is None
    r = Router(8, MoEConfig(num_experts=4, top_k=1, router="sigmoid_bias", bias_update_rate=0.0)).train()
    r(torch.randn(10, 8))
    r.update_bias()
    assert torch.equal(r.expert_bias, torch.zeros(4))


def _split_router_check(device: str, weight_dtype: torch.dtype) -> None:
    """The split-bf16 router GEMM (``_SplitRouterLogits``) against float64: logits and the weight gradient to fp32
    accuracy, the bf16 input gradient to bf16's own rounding."""
    from linear_moe.moe.router import _SplitRouterLogits

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(300, 96, generator=gen).bfloat16().to(device).requires_grad_()
    w = (0.1 * torch.randn(16, 96, generator=gen)).to(device, weight_dtype).requires_grad_()
    g = torch.randn(300, 16, generator=gen).to(device)
    logits = _SplitRouterLogits.apply(x, w)
    logits.backward(g)
    x64, w64, g64 = x.detach().double(), w.detach().double(), g.double()
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    assert logits.dtype == torch.float32 and rel(logits, x64 @ w64.T) < 1e-6
    assert w.grad.dtype == weight_dtype
    assert rel(w.grad, g64.T @ x64) < (1e-6 if weight_dtype == torch.float32 else 4e-3)
    want_dx = g64 @ w64
    assert x.grad.dtype == torch.bfloat16
    # no worse than rounding the exact gradient to bf16 (plus a little)
    assert rel(x.grad, want_dx) < 1.2 * rel(want_dx.bfloat16(), want_dx) + 1e-4


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_split_bf16_router_gemm_keeps_fp32_accuracy(weight_dtype):
    _split_router_check("cpu", weight_dtype)


def test_router_takes_the_fp32_gemm_off_cuda_and_for_fp32_activations():
    from linear_moe.moe import router as router_mod

    calls = []
    real = router_mod._SplitRouterLogits.apply
    router_mod._SplitRouterLogits.apply = lambda *a: calls.append(a) or real(*a)
    try:
        r = Router(32, MoEConfig(num_experts=4, top_k=2))
        r(torch.randn(5, 32).bfloat16())
        r(torch.randn(5, 32))
    finally:
        router_mod._SplitRouterLogits.apply = real
    assert calls == []
