"""The SwiGLU autograd function against plain autograd (float64 gradcheck, fp32/bf16 values) and what it
saves for backward."""
import pytest
import torch
import torch.nn.functional as F

from linear_moe.moe.swiglu import swiglu, swiglu_reference


@pytest.mark.parametrize("with_weight", [False, True])
def test_gradcheck_float64(with_weight):
    g = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    inputs = (g, u, w) if with_weight else (g, u)
    assert torch.autograd.gradcheck(swiglu, inputs)
    want = F.silu(g) * u * (w[:, None] if with_weight else 1)
    torch.testing.assert_close(swiglu(*inputs), want)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_matches_plain_autograd(dtype, tol):
    g = (3 * torch.randn(33, 24)).to(dtype).requires_grad_()
    u = torch.randn(33, 24).to(dtype).requires_grad_()
    w = torch.rand(33, requires_grad=True)  # fp32 routing weights with 16-bit activations
    out = swiglu(g, u, w)
    ref = swiglu_reference(g, u, w)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (g, u, w), go)
    # reference gradients in float64 from the same (rounded) inputs
    g64, u64, w64 = (t.detach().double().requires_grad_() for t in (g, u, w))
    want = torch.autograd.grad(F.silu(g64) * u64 * w64[:, None], (g64, u64, w64), go.double())
    for a, b in zip(got, want):
        assert a.dtype == (torch.float32 if a.dim() == 1 else dtype)
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * b.abs().max().item())


def test_saves_only_its_inputs():
    g = torch.randn(8, 4, requires_grad=True)
    u = torch.randn(8, 4, requires_grad=True)
    w = torch.rand(8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu(g, u, w)
    assert len(saved) == 3 and {id(t) for t in saved} == {id(g), id(u), id(w)}


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 2\)"):
        swiglu(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"weight must be \[rows\]=\(4,\)"):
        swiglu(torch.randn(4, 3), torch.randn(4, 3), torch.rand(3))
