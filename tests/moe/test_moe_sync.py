"""The dropless single-rank forward + backward makes no host-device sync, checked on CPU.

A dispatch mode raises on every aten op that must read device data on the host (``.item()``/``bool()``
go through ``_local_scalar_dense``; ``nonzero``, boolean indexing, one-argument ``where``,
``repeat_interleave`` without ``output_size``, ``unique``, ``bincount``, ...), and ``Tensor.tolist`` /
``numpy`` / ``cpu`` are patched to raise. The GPU test (``test_moe_cuda.py``) checks the same with
``torch.cuda.set_sync_debug_mode``.
"""
import dataclasses

import pytest
import torch

from linear_moe.moe import MoEConfig, MoELayer, collect_expert_load
from linear_moe.moe.experts import _grouped_mm_runs

from host_sync import no_host_sync  # noqa: E402  (tests/conftest.py puts tests/ on the path)


class _SyncInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        grad.nonzero()
        return grad * 2


CFG = MoEConfig(num_experts=8, top_k=2, expert_hidden_size=16, num_shared_experts=1, shared_expert_gate=True,
                z_loss_coef=1e-3, seq_aux_loss=True)
needs_grouped = pytest.mark.skipif(not _grouped_mm_runs(torch.device("cpu"), torch.float32),
                                   reason="torch._grouped_mm does not run on this CPU build (the loop fallback syncs)")


@needs_grouped
@pytest.mark.parametrize("router", ["softmax", "deepseek", "sigmoid_bias"])
def test_dropless_forward_backward_makes_no_host_sync(monkeypatch, router):
    extra = dict(n_group=2, topk_group=1, bias_update_rate=1e-2) if router != "softmax" else {}
    layer = MoELayer(16, dataclasses.replace(CFG, router=router, **extra)).train()
    x = torch.randn(2, 6, 16, requires_grad=True)
    layer(x)  # warm-up outside the check: the first call probes grouped_mm once (that probe reads a bool)
    with no_host_sync(monkeypatch):
        y, aux = layer(x)
        (y.square().sum() + aux.loss).backward()
        layer.update_bias()
        stats = dict(layer.last_stats)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in stats.values())
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())
    assert collect_expert_load(layer).sum().item() == 12 * 2  # read at logging time, outside the hot path


@needs_grouped
def test_the_check_catches_syncs(monkeypatch):
    """Capacity dropping selects kept rows with a boolean mask (a sync by design): the check must see it."""
    layer = MoELayer(16, dataclasses.replace(CFG, capacity_factor=1.0)).train()
    x = torch.randn(2, 6, 16)
    layer(x)
    with pytest.raises(AssertionError, match="host sync"):
        with no_host_sync(monkeypatch):
            layer(x)
    loop = MoELayer(16, dataclasses.replace(CFG, expert_backend="loop")).train()  # counts.tolist()
    with pytest.raises(AssertionError, match="host sync: Tensor.tolist"):
        with no_host_sync(monkeypatch):
            loop(x)
    y = _SyncInBackward.apply(torch.randn(3, requires_grad=True))
    with pytest.raises(AssertionError, match="nonzero"):  # backward runs under the check too
        with no_host_sync(monkeypatch):
            y.sum().backward()
    for reintroduced in (lambda t: t.sum().item(), lambda t: t.tolist(), lambda t: t[t > 0],
                         lambda t: torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2])), lambda t: t.nonzero()):
        with pytest.raises(AssertionError, match="host sync"):
            with no_host_sync(monkeypatch):
                reintroduced(torch.randn(4))
