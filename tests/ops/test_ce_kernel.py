"""The fused cross-entropy's Triton kernel (``ops/ce_kernel.py``) against the PyTorch form of the same step, and
the whole fused loss with the kernel switched on against the full-logits loss.

Runs on CUDA, or on CPU through Triton's interpreter (TRITON_INTERPRET=1, which
tests/conftest.py sets before Triton is imported) when Triton is installed; skips when it is absent.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from linear_moe.ops import ce_kernel, cross_entropy  # noqa: E402
from ops_testing import generator, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rows(g, n, vocab, dtype, spread=4.0):
    logits = (torch.randn(n, vocab, generator=g) * spread).to(DEVICE, dtype)
    labels = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    valid = torch.rand(n, generator=g).to(DEVICE) > 0.2
    valid[0], valid[-1] = False, True  # always an ignored row and a counted one (a random draw may lack either)
    scale = torch.where(valid, torch.rand(n, generator=g).to(DEVICE) + 0.5, 0.0)
    return logits, labels, valid, scale


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("vocab", [50, 5000])  # one masked block; two blocks of 4096 with a ragged tail
def test_kernel_matches_the_torch_form(dtype, tol, vocab):
    logits, labels, valid, scale = _rows(generator(), 19, vocab, dtype)
    want_loss, want_grad = cross_entropy._softmax_grad_torch(logits.clone(), labels, valid, scale, torch.float32, True)
    got = logits.clone()
    rows = ce_kernel.cross_entropy_rows_(got, labels, scale, write_grad=True)
    assert rel_err(torch.where(valid, rows, 0).sum(), want_loss) < 1e-5
    # each row against F.cross_entropy in float64 from the same (rounded) logits
    ref = F.cross_entropy(logits.double(), labels, reduction="none")
    assert rel_err(rows.double()[valid], ref[valid]) < 1e-5
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want_grad.double(), rtol=tol, atol=tol * scale.max().item())
    assert got[~valid].abs().max() == 0  # ignored rows: scale 0, no gradient


def test_kernel_is_stable_for_large_logits_and_a_late_maximum():
    """Logits of +-1e4 overflow a naive exp; the row's maximum sits in the last, ragged block, where the
    running maximum of the other lanes must be rescaled, and masked lanes must not turn into nan."""
    vocab = 4096 + 37
    logits = torch.full((3, vocab), -1e4, device=DEVICE)
    logits[:, -5] = 1e4
    logits[1, 7] = 1e4 - 1.0
    labels = torch.tensor([vocab - 5, 7, 0], device=DEVICE)
    scale = torch.ones(3, device=DEVICE)
    got = logits.clone()
    rows = ce_kernel.cross_entropy_rows_(got, labels, scale, write_grad=True)
    ref = F.cross_entropy(logits.double(), labels, reduction="none")
    assert torch.isfinite(rows).all() and torch.isfinite(got).all()
    # fp32 resolves 1e4 to ~1e-3: the loss (a difference of two such numbers) is that exact
    torch.testing.assert_close(rows.double(), ref, rtol=0, atol=2e-3)
    want = torch.softmax(logits.double(), -1) - F.one_hot(labels, vocab).double()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-3)


def test_loss_only_leaves_the_logits_alone():
    logits, labels, valid, scale = _rows(generator(), 5, 300, torch.float32)
    got = logits.clone()
    rows = ce_kernel.cross_entropy_rows_(got, labels, scale, write_grad=False)
    assert torch.equal(got, logits)
    # fp32 rows against a float64 reference: fp32's tolerance (the float64 default of 1e-7 fails one draw in a few)
    ref = F.cross_entropy(logits.double(), labels, reduction="none")
    torch.testing.assert_close(rows.double(), ref, rtol=1e-5, atol=1e-6)


def test_refuses_logits_with_strided_rows():
    logits = torch.zeros(4, 10, device=DEVICE).t()
    with pytest.raises(ValueError, match="contiguous rows"):
        ce_kernel.cross_entropy_rows_(logits, torch.zeros(10, dtype=torch.long, device=DEVICE),
                                      torch.ones(10, device=DEVICE), True)


@pytest.mark.parametrize("chunk_size", [8, 8192])
def test_fused_loss_through_the_kernel_equals_the_full_logits(monkeypatch, chunk_size):
    """The whole fused loss, kernel switched on (as on CUDA), against F.cross_entropy's loss and gradients."""
    calls = []
    real = ce_kernel.cross_entropy_rows_
    monkeypatch.setattr(cross_entropy, "_use_kernel", lambda logits, acc: acc == torch.float32)
    monkeypatch.setattr(ce_kernel, "cross_entropy_rows_", lambda *a: calls.append(1) or real(*a))
    g = generator()
    x = torch.randn(37, 16, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(300, 16, generator=g) * 0.5).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 300, (37,), generator=g).to(DEVICE)
    labels[[3, 10, 36]] = -100
    loss = cross_entropy.linear_cross_entropy(x, w, labels, chunk_size=chunk_size)
    dx, dw = torch.autograd.grad(loss, (x, w))
    assert len(calls) == -(-37 // chunk_size)
    ref = F.cross_entropy(x @ w.t(), labels, ignore_index=-100)
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, w))
    assert rel_err(loss, ref) < 1e-5 and rel_err(dx, ref_dx) < 1e-5 and rel_err(dw, ref_dw) < 1e-5
