"""MoELayer against the per-token reference (outputs and every gradient), capacity dropping, aux
outputs and stats, family shapes and config validation."""
import dataclasses
import importlib.util
import math

import pytest
import torch

from linear_moe.moe import MoEConfig, MoELayer, SwiGLUMLP, build_channel_mixer, load_balancing_loss, update_moe_biases
from linear_moe.moe.dispatch import sort_by_expert
from linear_moe.moe.reference import reference_moe_forward

C = 16
CASES = {
    "mixtral": MoEConfig(num_experts=8, top_k=2, expert_hidden_size=24, router="softmax", norm_topk_prob=True),
    "qwen2": MoEConfig(num_experts=12, top_k=4, expert_hidden_size=8, router="softmax", norm_topk_prob=False,
                       num_shared_experts=1, shared_expert_hidden_size=32, shared_expert_gate=True),
    "deepseek_v2": MoEConfig(num_experts=16, top_k=3, expert_hidden_size=8, router="deepseek", norm_topk_prob=False,
                             n_group=4, topk_group=2, routed_scaling_factor=2.0, num_shared_experts=2, seq_aux_loss=True),
    "sigmoid_bias": MoEConfig(num_experts=8, top_k=2, expert_hidden_size=12, router="sigmoid_bias", n_group=2,
                              topk_group=1, bias_update_rate=0.01),
    "capacity": MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8, capacity_factor=0.75, eval_capacity_factor=0.5),
}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _grads(layer, x, fn):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


# fused_gather: Triton GEMMs reading the routed rows by index (on CPU through the interpreter, see conftest)
FUSED = pytest.param("fused_gather", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                              reason="needs Triton"))


@pytest.mark.parametrize("backend", ["auto", "loop", FUSED])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("training", [True, False])
def test_layer_matches_per_token_reference(name, backend, training):
    cfg = dataclasses.replace(CASES[name], expert_backend=backend)
    layer = MoELayer(C, cfg).train(training)
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.normal_(std=0.2)
    x = torch.randn(2, 6, C)
    y, gx, grads = _grads(layer, x, lambda v: layer(v)[0])
    ry, rgx, rgrads = _grads(layer, x, lambda v: reference_moe_forward(layer, v))
    assert y.shape == x.shape
    assert _rel(y, ry) < 1e-5
    assert _rel(gx, rgx) < 1e-5
    assert set(grads) == set(rgrads) == {n for n, _ in layer.named_parameters()}
    for n in grads:
        assert _rel(grads[n], rgrads[n]) < 1e-5, n


def test_sort_by_expert_drops_later_tokens_first():
    # token t picks experts idx[t]; capacity 2 per expert
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 3]])
    order, counts, dropped = sort_by_expert(idx, 4, capacity=2)
    kept = [(o // 2, idx.reshape(-1)[o].item()) for o in order.tolist()]
    assert kept == [(0, 0), (1, 0), (0, 1), (2, 1), (1, 2), (4, 2), (4, 3)]
    assert counts.tolist() == [2, 2, 2, 1] and dropped.item() == 3
    order, counts, dropped = sort_by_expert(idx, 4)
    assert len(order) == 10 and counts.tolist() == [4, 3, 2, 1] and dropped.item() == 0


def test_capacity_drops_exactly_the_overflowing_tokens():
    cfg = MoEConfig(num_experts=4, top_k=1, expert_hidden_size=8, capacity_factor=1.0, aux_loss_coef=0.0)
    layer = MoELayer(C, cfg).train()
    with torch.no_grad():  # all tokens prefer expert 2: only the first 2 (= ceil(1.0 * 8 * 1 / 4)) get through
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 50.0
    x = torch.randn(8, C)
    x[:, 0] = x[:, 0].abs() + 1
    y, aux = layer(x)
    expert = reference_moe_forward(layer.eval().train(False), x[:2])  # eval: dropless, two tokens
    torch.testing.assert_close(y[:2], expert, rtol=1e-5, atol=1e-6)
    assert torch.equal(y[2:], torch.zeros_like(y[2:]))
    assert aux.dropped_fraction.item() == pytest.approx(6 / 8)
    assert aux.tokens_per_expert.tolist() == [0, 0, 8, 0]


def test_eval_uses_eval_capacity_factor():
    layer = MoELayer(C, CASES["capacity"])
    assert layer.train().capacity(12) == math.ceil(0.75 * 12 * 2 / 4)
    assert layer.eval().capacity(12) == math.ceil(0.5 * 12 * 2 / 4)
    layer.cfg = dataclasses.replace(layer.cfg, eval_capacity_factor=0.0)
    assert layer.capacity(12) is None


def test_aux_outputs_and_last_stats():
    cfg = dataclasses.replace(CASES["deepseek_v2"], aux_loss_coef=0.1, z_loss_coef=0.01)
    layer = MoELayer(C, cfg).train()
    x = torch.randn(3, 5, C)
    y, aux = layer(x)
    r = layer.router(x.reshape(-1, C))
    want_balance = load_balancing_loss(r.probs, r.topk_idx, cfg.num_experts, seq_len=5)
    torch.testing.assert_close(aux.balance_loss, want_balance)
    torch.testing.assert_close(aux.z_loss, torch.logsumexp(r.logits, -1).square().mean())
    torch.testing.assert_close(aux.loss, 0.1 * aux.balance_loss + 0.01 * aux.z_loss)
    torch.testing.assert_close(aux.balance_loss_scaled, 0.1 * aux.balance_loss)
    assert aux.tokens_per_expert.sum().item() == 15 * cfg.top_k and not aux.tokens_per_expert.requires_grad
    assert aux.dropped_fraction.item() == 0
    assert torch.equal(layer.last_stats["tokens_per_expert"], aux.tokens_per_expert)
    aux.loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_update_moe_biases_walks_all_layers():
    model = torch.nn.Sequential(MoELayer(C, CASES["sigmoid_bias"]), MoELayer(C, CASES["sigmoid_bias"])).train()
    x = torch.randn(4, 8, C)
    for layer in model:
        layer(x)
    update_moe_biases(model)
    for layer in model:
        assert layer.router.expert_bias.abs().sum() > 0
        assert layer.router.load_since_update.sum() == 0


def test_builds_on_meta_then_initialises():
    cfg = dataclasses.replace(CASES["sigmoid_bias"], num_shared_experts=1, shared_expert_gate=True)
    with torch.device("meta"):
        layer = MoELayer(C, cfg)
    layer.to_empty(device="cpu")
    layer.reset_parameters(std=0.02)
    assert torch.equal(layer.router.expert_bias, torch.zeros(cfg.num_experts))
    for name, p in layer.named_parameters():
        assert 0.012 < p.std().item() < 0.028 or p.numel() < 100, name
    y, aux = layer(torch.randn(2, 3, C))
    assert torch.isfinite(y).all() and torch.isfinite(aux.loss)


@pytest.mark.parametrize("family", ["mixtral", "qwen2", "deepseek_v2", "llama3"])
def test_families_build_from_moe_config(family):
    cfgs = {
        "mixtral": MoEConfig(num_experts=8, top_k=2, norm_topk_prob=True, expert_hidden_size=16),
        "qwen2": MoEConfig(num_experts=60, top_k=4, norm_topk_prob=False, expert_hidden_size=8, num_shared_experts=1,
                           shared_expert_hidden_size=32, shared_expert_gate=True),
        "deepseek_v2": MoEConfig(num_experts=64, top_k=6, router="deepseek", norm_topk_prob=False, n_group=8, topk_group=3,
                                 routed_scaling_factor=16.0, num_shared_experts=2, expert_hidden_size=8, first_k_dense=1),
        "llama3": MoEConfig(),
    }
    cfg = cfgs[family]
    kind = "D" if family == "llama3" else "E"
    layer = build_channel_mixer(kind, C, cfg, intermediate_size=40)
    x = torch.randn(2, 4, C)
    if kind == "D":
        assert isinstance(layer, SwiGLUMLP) and layer(x).shape == x.shape
        return
    y, aux = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(aux.loss)
    assert layer.experts.gate_proj.shape == (cfg.num_experts, cfg.expert_hidden_size, C)
    if cfg.num_shared_experts:
        assert layer.shared_expert.intermediate_size == cfg.shared_hidden_size()
    assert (layer.shared_expert_gate is not None) == cfg.shared_expert_gate


@pytest.mark.parametrize("fields, match", [
    (dict(top_k=9), "top_k=9"),
    (dict(top_k=0), "top_k=0"),
    (dict(capacity_factor=-1.0), "capacity_factor=-1.0"),
    (dict(eval_capacity_factor=-0.5), "eval_capacity_factor=-0.5"),
    (dict(router="switch"), "router='switch'"),
    (dict(router="deepseek", n_group=3), "n_group=3"),
    (dict(router="deepseek", n_group=2, topk_group=3), "topk_group=3"),
    (dict(n_group=2), "needs moe.router deepseek"),
    (dict(expert_backend="cuda"), "expert_backend='cuda'"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),
])
def test_bad_configs_raise_clear_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        MoELayer(C, dataclasses.replace(MoEConfig(num_experts=8, top_k=2), **fields))


def test_bad_inputs_and_ep_divisibility():
    with pytest.raises(ValueError, match="not divisible by the expert-parallel size 3"):
        MoEConfig(num_experts=8).validate(ep_size=3)
    layer = MoELayer(C, MoEConfig(num_experts=4, top_k=1, expert_hidden_size=8))
    with pytest.raises(ValueError, match=r"got \(2, 3, 5\)"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="kind 'X'"):
        build_channel_mixer("X", C, MoEConfig(), 32)


def test_moe_layer_trains_under_bf16_autocast_with_fp32_weights():
    """The trainer's mixed precision: fp32 parameters, bf16 autocast; output close to the fp32 layer."""
    import torch

    from linear_moe.moe import MoEConfig, MoELayer

    torch.manual_seed(0)
    layer = MoELayer(32, MoEConfig(num_experts=4, top_k=2, expert_hidden_size=32, num_shared_experts=1,
                                   shared_expert_hidden_size=32, shared_expert_gate=True))
    x = torch.randn(2, 8, 32)
    ref, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
        (y.float().pow(2).mean() + aux.loss).backward()
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in layer.parameters())


def test_layer_keeps_only_gate_and_up_per_routed_row():
    """Dropless single rank, moe.expert_recompute on: of the [N * k, ...] activations, backward keeps the gate and up
    outputs only, as one [N * k, 2H] tensor (no gathered inputs, no SwiGLU output, no expert outputs)."""
    from linear_moe.moe.experts import _grouped_mm_runs

    if not _grouped_mm_runs(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm does not run on this CPU build")
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8, expert_recompute=True)
    layer = MoELayer(C, cfg).train()
    x = torch.randn(10, C, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    params = {p.data_ptr() for p in layer.parameters()}
    per_row = [tuple(t.shape) for t in saved if t.data_ptr() not in params and t.dim() == 2 and t.shape[0] == 20]
    assert per_row == [(20, 2 * 8)]


@pytest.mark.parametrize("recompute", [True, False])
def test_expert_recompute_off_keeps_rows_and_swiglu_output_and_changes_no_number(recompute, monkeypatch):
    """moe.expert_recompute=False (the default): backward reads the gathered rows [N * k, C] and the SwiGLU output
    [N * k, H] kept from forward instead of redoing them; output and every gradient equal the recomputing layer's."""
    from linear_moe.moe.experts import _grouped_mm_runs

    if not _grouped_mm_runs(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm does not run on this CPU build")
    torch.manual_seed(3)
    base = MoELayer(C, MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8, capacity_factor=0.75,
                                 expert_recompute=True)).train()
    layer = MoELayer(C, dataclasses.replace(base.cfg, expert_recompute=recompute)).train()
    layer.load_state_dict(base.state_dict())
    x = torch.randn(2, 5, C)
    want = _grads(base, x, lambda v: base(v)[0])
    from linear_moe.moe import experts as experts_mod

    asked, real = [], experts_mod.swiglu_backward_gate_up
    monkeypatch.setattr(experts_mod, "swiglu_backward_gate_up",
                        lambda *a, **k: asked.append(k.get("want_output")) or real(*a, **k))
    got = _grads(layer, x, lambda v: layer(v)[0])
    assert asked == [recompute]  # the backward pass rewrites the SwiGLU output only when it was not kept
    assert _rel(got[0], want[0]) < 1e-6 and _rel(got[1], want[1]) < 1e-6
    for n in want[2]:
        assert _rel(got[2][n], want[2][n]) < 1e-6, n
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x.requires_grad_())
    params = {p.data_ptr() for p in layer.parameters()}
    rows = round(float(layer.last_stats["tokens_per_expert"].sum() * (1 - layer.last_stats["dropped_fraction"])))
    per_row = sorted(t.shape[1] for t in saved if t.data_ptr() not in params and t.dim() == 2 and t.shape[0] == rows)
    assert per_row == ([2 * 8] if recompute else [8, 2 * 8, C])

