"""Mamba2's output stage (``ops.ssm_output``): the PyTorch form against a float64 reference, and our Triton kernel
(CUDA's path; here through Triton's interpreter) against the PyTorch form, outputs and every gradient."""
import pytest
import torch
import torch.nn.functional as F

from linear_moe import ops
from linear_moe.ops.ssm_output import ssm_output_torch
from ops_testing import generator

try:
    from linear_moe.ops.backends.triton import ssm_output as kernel
except ImportError:  # no Triton on this machine
    kernel = None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, Triton's interpreter on the CPU


def _inputs(g, B, T, H, P, dtype):
    C = H * P
    return dict(y=torch.randn(B, T, H, P, generator=g).to(dtype), x=torch.randn(B, T, H, P, generator=g).to(dtype),
                D=torch.randn(H, generator=g), z=(2 * torch.randn(B, T, C, generator=g)).to(dtype),
                weight=1 + 0.5 * torch.randn(C, generator=g))


def _reference(y, x, D, z, weight, groups, eps):
    """Token by token, group by group, in float64: (y + D x) * silu(z), then x / rms(x) * w per group."""
    B, T, H, P = y.shape
    out = torch.empty(B, T, H * P, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            a = (y[b, t].double() + D.double()[:, None] * x[b, t].double()).reshape(-1) * F.silu(z[b, t].double())
            parts = [p / torch.sqrt((p * p).mean() + eps) for p in a.view(groups, -1)]
            out[b, t] = torch.cat(parts) * weight.double()
    return out


@pytest.mark.parametrize("groups", [1, 2])
def test_torch_form_equals_the_float64_reference_and_the_layer_options(groups):
    g = generator()
    args = _inputs(g, 2, 5, 4, 3, torch.float64)
    want = _reference(**args, groups=groups, eps=1e-5)
    torch.testing.assert_close(ops.ssm_output(**args, groups=groups, eps=1e-5), want)
    no_norm = ops.ssm_output(args["y"], args["x"], args["D"], args["z"], None)
    torch.testing.assert_close(no_norm, ((args["y"] + args["D"][:, None] * args["x"]).reshape(2, 5, 12)
                                         * F.silu(args["z"])))
    assert ops.ssm_output(**args, groups=groups, out_dtype=torch.float32).dtype == torch.float32


def test_bad_shapes_are_refused():
    args = _inputs(generator(), 1, 4, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="D \\(3,\\); want y and x"):
        ops.ssm_output(args["y"], args["x"], args["D"][:3], args["z"], args["weight"])
    with pytest.raises(ValueError, match="groups=5; want weight \\[H\\*P\\] = \\[12\\] and groups dividing 12"):
        ops.ssm_output(**args, groups=5)
    with pytest.raises(ValueError, match="z \\(1, 4, 11\\)"):
        ops.ssm_output(args["y"], args["x"], args["D"], args["z"][..., :11], args["weight"])


def test_cpu_tensors_take_the_torch_form():
    import importlib

    assert importlib.import_module("linear_moe.ops.ssm_output")._kernel(torch.zeros(1)) is None


@pytest.mark.skipif(kernel is None, reason="needs Triton")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape, groups", [((2, 19, 4, 6), 1), ((1, 33, 6, 5), 3)], ids=["1group", "3groups"])
def test_kernel_matches_the_torch_form_with_gradients(dtype, tol, shape, groups):
    """Rows not a multiple of the kernel's 16 per program, channels per group not a power of two (masked lanes),
    several groups; fp32 and bf16 inputs (fp32 math inside), output in bf16 as the layer asks."""
    g = generator()
    B, T, H, P = shape
    args = {n: t.to(DEVICE) for n, t in _inputs(g, B, T, H, P, dtype).items()}
    leaves = {n: t.clone().requires_grad_() for n, t in args.items()}
    out = kernel.ssm_output(**leaves, groups=groups, eps=1e-5, out_dtype=dtype)
    assert out.dtype == dtype
    dout = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    ref_leaves = {n: t.detach().float().requires_grad_() for n, t in args.items()}
    ref = ssm_output_torch(**ref_leaves, groups=groups, eps=1e-5)
    ref_grads = torch.autograd.grad(ref, list(ref_leaves.values()), dout.float())
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    for name, a, b in zip(leaves, grads, ref_grads):
        assert a.dtype == leaves[name].dtype, name
        torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()), msg=name)
