"""The overhead benchmark's CPU dry run, the op-count regression bound, and the op cuts held to the old math:
fused input projections, F.rms_norm, the fp32 router under autocast, expert weights cast once per step."""
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import overhead_bench  # noqa: E402

from linear_moe.layers.common import OutputNormGate, RMSNorm, fused_projections  # noqa: E402
from linear_moe.model.causal_lm import LinearMoEForCausalLM  # noqa: E402
from linear_moe.moe.config import MoEConfig  # noqa: E402
from linear_moe.moe.experts import GroupedExperts, cast_expert_weights_once  # noqa: E402
from linear_moe.moe.router import Router  # noqa: E402

# Aten ops dispatched by one training step (bf16 autocast, fused AdamW) of the 2-layer tiny gdn model below,
# views included: 1712 before the cuts of issue 9 (fused projections, fp32 router, F.rms_norm, MoE aux
# losses), 1520 after.
GDN_2_LAYER_OPS = 1520


def _gen(seed_offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() + seed_offset)


def test_dry_run_counts_ops_by_phase_and_category(tmp_path, capsys):
    result = overhead_bench.main(["--device", "cpu", "--kinds", "gdn,attention", "--tokens", "64", "--seq-len", "32",
                                  "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    rows = result["rows"]
    assert [r["kind"] for r in rows] == ["gdn", "attention"]
    for r in rows:
        for phase in overhead_bench.PHASES:
            assert r["ops"][phase] == sum(r["by_category"][phase].values())
        assert r["ops"]["forward"] > 100 and r["ops"]["backward"] > 100 and r["ops"]["optimizer"] >= 1
        assert r["by_category"]["forward"]["matmul"] >= 12 * 2  # 12 layers: at least a mixer and an expert GEMM
        assert r["ops_total"] == sum(r["ops"].values()) and r["host_ms"] > 0
        assert sum(r["forward_by_source"].values()) == r["ops"]["forward"]
        assert {"layers", "moe", "model"} <= set(r["forward_by_source"])
    assert json.loads((tmp_path / "overhead_bench.json").read_text())["rows"][0]["ops"] == rows[0]["ops"]
    assert "host" in capsys.readouterr().out


def _two_layer_gdn_ops(cast_weights_once: bool = False, grad_accum: int = 1) -> dict:
    cfg = overhead_bench.build_config("gdn", "tiny")
    cfg = dataclasses.replace(cfg, num_layers=2, layer_pattern="LL")
    model = LinearMoEForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    if cast_weights_once:
        cast_expert_weights_once(model, opt)
    x = torch.randint(0, cfg.vocab_size, (2, 32), generator=_gen())
    step = overhead_bench.make_step(model, opt, x, torch.device("cpu"), torch.bfloat16, grad_accum=grad_accum)
    step()
    counter = overhead_bench.OpCounter()
    with counter:
        overhead_bench.make_step(model, opt, x, torch.device("cpu"), torch.bfloat16, counter, grad_accum)()
    return counter


def test_ops_per_step_stay_at_or_below_the_cut_count():
    counter = _two_layer_gdn_ops()
    total = sum(sum(c.values()) for c in counter.counts.values())
    assert total <= GDN_2_LAYER_OPS + 20, f"{total} ops per step, was {GDN_2_LAYER_OPS}: {counter.counts}"
    # per layer three mm: the mixer's six input projections as one, o_proj, the router; plus the fused loss's
    # three (logits, and the input and weight gradients it computes in the forward pass), none in backward
    assert counter.counts["forward"]["mm"] <= 2 * 3 + 3


def test_cast_weights_once_saves_the_expert_casts_of_later_micro_batches():
    plain, once = _two_layer_gdn_ops(grad_accum=2), _two_layer_gdn_ops(cast_weights_once=True, grad_accum=2)
    copies = lambda c: c.categories["forward"]["copy"]  # noqa: E731
    assert copies(once) == copies(plain) - 2 * 2  # 2 layers x 2 expert weights (gate|up, down), second micro-batch


def test_fused_projections_match_separate_linears_in_value_and_gradient():
    g = _gen()
    widths = (48, 48, 96, 3, 3, 96)
    linears = [nn.Linear(64, w, bias=False) for w in widths]
    for lin in linears:
        nn.init.normal_(lin.weight, generator=g)
    x = torch.randn(2, 16, 64, generator=g, requires_grad=True)
    fused = fused_projections(x, linears[0], None, *linears[1:])
    assert fused[1] is None
    fused = [fused[0], *fused[2:]]
    grads = [torch.randn(2, 16, w, generator=g) for w in widths]
    got = torch.autograd.grad(fused, [x, *(lin.weight for lin in linears)], grads)
    sep = [lin(x) for lin in linears]
    want = torch.autograd.grad(sep, [x, *(lin.weight for lin in linears)], grads)
    for a, b in zip(fused, sep):  # the same sums; the narrow outputs may take another GEMM kernel's order
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-4)


def test_fused_projections_run_linears_with_bias_one_by_one():
    a, b = nn.Linear(8, 4), nn.Linear(8, 5, bias=False)
    x = torch.randn(3, 8, generator=_gen())
    ya, yb = fused_projections(x, a, b)
    assert torch.equal(ya, a(x)) and torch.equal(yb, b(x))


def test_rms_norms_equal_the_written_out_formula_in_fp32():
    g = _gen()
    x = torch.randn(2, 5, 3, 32, generator=g)
    norm = RMSNorm(32, eps=1e-6)
    nn.init.normal_(norm.weight, generator=g)
    want = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), want, rtol=0, atol=1e-6)
    gate_norm = OutputNormGate(32, norm="rmsnorm", gate_fn="swish")
    nn.init.normal_(gate_norm.weight, generator=g)
    gate = torch.randn(2, 5, 96, generator=g)
    want = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5) * gate_norm.weight * F.silu(gate.view_as(x))
    torch.testing.assert_close(gate_norm(x, gate), want, rtol=0, atol=1e-6)
    xb = x.bfloat16()  # bf16 in: fp32 compute, bf16 out
    torch.testing.assert_close(norm(xb), (xb.float() * torch.rsqrt(xb.float().square().mean(-1, keepdim=True) + 1e-6)
                                          * norm.weight).bfloat16(), rtol=0, atol=0)


def test_router_runs_in_fp32_under_autocast():
    router = Router(64, MoEConfig(num_experts=8, top_k=2))
    x = torch.randn(16, 64, generator=_gen())
    want = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
    assert got.logits.dtype == torch.float32
    assert torch.equal(got.logits, want.logits) and torch.equal(got.topk_idx, want.topk_idx)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_cast_weights_once_gives_the_per_use_cast_gradients_and_follows_the_optimizer(grad_accum):
    g = _gen()
    experts = GroupedExperts(4, 32, 16)
    twin = GroupedExperts(4, 32, 16)
    twin.load_state_dict(experts.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (experts, twin)]
    cast_expert_weights_once(experts, opts[0])
    counts = torch.tensor([3, 0, 2, 3])
    for _ in range(3):  # the second and third steps must see the updated weights
        for _ in range(grad_accum):
            x = torch.randn(8, 32, generator=g)
            w = torch.rand(8, generator=g)
            for m in (experts, twin):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = m(x, counts, w)
                y.float().square().sum().backward()
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(getattr(experts, name).grad, getattr(twin, name).grad), name
        for opt in opts:
            opt.step()
            opt.zero_grad()
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(getattr(experts, name), getattr(twin, name))
    assert experts._cast_cache == {}  # cleared by the optimizer step
    with torch.no_grad():  # an in-place write outside the optimizer: the version counter catches it
        experts.gate_proj.mul_(2)
        twin.gate_proj.mul_(2)
    x = torch.randn(8, 32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        experts(x, counts)
        with torch.no_grad():
            experts.gate_proj.mul_(1)  # bumps the version: the next forward recasts
        assert torch.equal(experts(x, counts), twin(x, counts))
