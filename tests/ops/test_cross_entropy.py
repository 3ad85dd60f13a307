"""The fused linear cross-entropy (loss and gradients in the forward pass) against the full-logits
``F.cross_entropy`` and against the checkpointed form (``fused=False``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from host_sync import no_host_sync
from linear_moe.ops.cross_entropy import linear_cross_entropy
from ops_testing import generator, rel_err

VOCAB, HIDDEN = 50, 16


def inputs(g, n=37, dtype=torch.float32, ignored=(3, 10, 36)):
    x = torch.randn(n, HIDDEN, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(VOCAB, HIDDEN, generator=g, dtype=dtype) * 0.5).requires_grad_()
    labels = torch.randint(0, VOCAB, (n,), generator=g)
    labels[list(ignored)] = -100
    return x, w, labels


def reference(x, w, labels):
    """Loss and (dx, dw) from the full logits."""
    loss = F.cross_entropy(x @ w.t(), labels, ignore_index=-100)
    return (loss, *torch.autograd.grad(loss, (x, w)))


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [8, 37, 8192])  # several chunks with a ragged last one; one; one, larger
def test_fused_loss_and_grads_equal_the_full_logits(dtype, chunk_size):
    x, w, labels = inputs(generator(), dtype=dtype)
    ref_loss, ref_dx, ref_dw = reference(x, w, labels)
    loss = linear_cross_entropy(x, w, labels, chunk_size=chunk_size)
    dx, dw = torch.autograd.grad(loss, (x, w))
    assert loss.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert rel_err(loss, ref_loss) < 1e-6
    assert rel_err(dx, ref_dx) < 1e-5
    assert rel_err(dw, ref_dw) < 1e-5


def test_fused_scales_by_the_incoming_gradient():
    x, w, labels = inputs(generator())
    _, ref_dx, ref_dw = reference(x, w, labels)
    dx, dw = torch.autograd.grad(linear_cross_entropy(x, w, labels, chunk_size=8) * -2.5, (x, w))
    assert rel_err(dx, -2.5 * ref_dx) < 1e-5
    assert rel_err(dw, -2.5 * ref_dw) < 1e-5


def test_bf16_autocast_is_close_to_fp32_and_grads_come_in_the_parameters_dtype():
    x, w, labels = inputs(generator(), n=64)
    ref_loss, ref_dx, ref_dw = reference(x, w, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, labels, chunk_size=16)
        old = linear_cross_entropy(x, w, labels, chunk_size=16, fused=False)
    dx, dw = torch.autograd.grad(loss, (x, w))
    old_dx, old_dw = torch.autograd.grad(old, (x, w))
    assert loss.dtype == torch.float32 and dx.dtype == torch.float32 and dw.dtype == torch.float32
    assert rel_err(loss, ref_loss) < 2e-2
    assert rel_err(dx, ref_dx) < 2e-2
    assert rel_err(dw, ref_dw) < 2e-2
    # the same bf16 matmuls as the checkpointed form: much closer to it than to fp32
    assert rel_err(loss, old) < 1e-5
    assert rel_err(dx, old_dx) < 5e-3
    assert rel_err(dw, old_dw) < 5e-3


@pytest.mark.parametrize("wanted", ["x", "weight"])
def test_grad_for_one_input_only(wanted):
    x, w, labels = inputs(generator())
    _, ref_dx, ref_dw = reference(x, w, labels)
    x.requires_grad_(wanted == "x")
    w.requires_grad_(wanted == "weight")
    with CountMatmuls() as counter:
        loss = linear_cross_entropy(x, w, labels, chunk_size=8)
        loss.backward()
    assert counter.count == 5 * 2  # 5 chunks: logits and the one wanted gradient
    if wanted == "x":
        assert w.grad is None and rel_err(x.grad, ref_dx) < 1e-5
    else:
        assert x.grad is None and rel_err(w.grad, ref_dw) < 1e-5


def test_no_grad_returns_the_loss_and_does_no_gradient_work():
    x, w, labels = inputs(generator())
    ref_loss = F.cross_entropy(x @ w.t(), labels, ignore_index=-100)
    with torch.no_grad(), CountMatmuls() as counter:
        loss = linear_cross_entropy(x, w, labels, chunk_size=8)
    assert counter.count == 5  # the logits only
    assert not loss.requires_grad and rel_err(loss, ref_loss) < 1e-6


def test_fused_needs_one_matmul_less_than_the_checkpointed_form():
    x, w, labels = inputs(generator())
    counts = {}
    for fused in (True, False):
        with CountMatmuls() as counter:
            linear_cross_entropy(x, w, labels, chunk_size=8, fused=fused).backward()
        counts[fused] = counter.count
    assert counts == {True: 5 * 3, False: 5 * 4}


def test_all_labels_ignored_gives_zero_loss_and_zero_grads():
    x, w, labels = inputs(generator(), n=9, ignored=range(9))
    loss = linear_cross_entropy(x, w, labels, chunk_size=4)
    dx, dw = torch.autograd.grad(loss, (x, w))
    assert loss.item() == 0.0
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))


def test_fused_makes_no_host_sync(monkeypatch):
    x, w, labels = inputs(generator())
    with no_host_sync(monkeypatch):
        loss = linear_cross_entropy(x, w, labels, chunk_size=8)
        loss.backward()
    _, ref_dx, ref_dw = reference(x.detach().requires_grad_(), w.detach().requires_grad_(), labels)
    assert rel_err(x.grad, ref_dx) < 1e-5 and rel_err(w.grad, ref_dw) < 1e-5


def test_a_second_backward_through_the_fused_loss_raises():
    """The stored gradients are scaled in place by the first backward pass; a second must not reuse them."""
    x, w, labels = inputs(generator())
    loss = linear_cross_entropy(x, w, labels, chunk_size=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


class _CudaLogits:
    """Stands in for CUDA logits: the kernel switch reads only ``is_cuda``."""
    is_cuda = True


def test_the_triton_kernel_is_the_default_on_cuda_and_can_be_switched_off(monkeypatch):
    from linear_moe.ops import cross_entropy

    monkeypatch.setattr(cross_entropy, "_kernel", lambda: object())  # as where Triton imports
    monkeypatch.delenv("LINEAR_MOE_CE_KERNEL", raising=False)
    assert cross_entropy._use_kernel(_CudaLogits(), torch.float32)
    assert not cross_entropy._use_kernel(_CudaLogits(), torch.float64)  # float64 arithmetic stays in PyTorch
    assert not cross_entropy._use_kernel(torch.zeros(2, 3), torch.float32)  # CPU logits
    monkeypatch.setenv("LINEAR_MOE_CE_KERNEL", "0")
    assert not cross_entropy._use_kernel(_CudaLogits(), torch.float32)
    monkeypatch.setattr(cross_entropy, "_kernel", lambda: None)  # no Triton: the PyTorch form
    monkeypatch.setenv("LINEAR_MOE_CE_KERNEL", "1")
    assert not cross_entropy._use_kernel(_CudaLogits(), torch.float32)


def test_an_unknown_kernel_setting_is_refused(monkeypatch):
    from linear_moe.ops import cross_entropy

    monkeypatch.setenv("LINEAR_MOE_CE_KERNEL", "yes")
    with pytest.raises(ValueError, match="LINEAR_MOE_CE_KERNEL='yes'.*allowed: '1'.*'0'"):
        cross_entropy._use_kernel(_CudaLogits(), torch.float32)
