"""The MoE Triton kernels (SwiGLU forward/backward with the routing weight, gather-sum) against their
PyTorch forms, and the whole layer with the kernels switched on against the per-token reference.

Runs on CUDA, or on CPU through Triton's interpreter (TRITON_INTERPRET=1, which
tests/conftest.py sets before Triton is imported) when Triton is installed; skips when it is absent.
"""
import pytest
import torch

pytest.importorskip("triton")

from linear_moe.moe import MoEConfig, MoELayer  # noqa: E402
from linear_moe.moe import kernels  # noqa: E402
from linear_moe.moe import permute as permute_module  # noqa: E402
from linear_moe.moe import swiglu as swiglu_module  # noqa: E402
from linear_moe.moe.reference import reference_moe_forward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _close(a, b, tol):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * max(b.abs().max().item(), 1.0))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("with_weight", [False, True])
def test_swiglu_kernels_match_torch(dtype, tol, with_weight):
    m, h = 37, 40  # neither a power of two: masked tails in both dims
    g = (3 * torch.randn(m, h, device=DEVICE)).to(dtype)
    u = torch.randn(m, h, device=DEVICE).to(dtype)
    w = torch.rand(m, device=DEVICE) if with_weight else None
    _close(kernels.swiglu_forward(g, u, w), swiglu_module.swiglu_reference(g, u, w), tol)
    dh = torch.randn(m, h, device=DEVICE).to(dtype)
    got = kernels.swiglu_backward(g, u, w, dh, want_output=True)
    want = swiglu_module._backward_torch(g, u, w, dh, want_output=True)
    _close(got[3], swiglu_module.swiglu_reference(g, u, w), tol)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype
            _close(a, b, tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("with_weight", [False, True])
def test_swiglu_kernels_on_the_stacked_gate_up_layout(monkeypatch, dtype, tol, with_weight):
    """gate and up as the two halves of one [M, 2H] buffer (rows of stride 2H, up at column offset H) in,
    one [M, 2H] gradient in the same layout out: against the torch path and against the kernels on the
    separate halves."""
    m, h = 37, 40
    gate_up = torch.cat([3 * torch.randn(m, h, device=DEVICE), torch.randn(m, h, device=DEVICE)], 1).to(dtype)
    gate, up = gate_up[:, :h], gate_up[:, h:]
    w = torch.rand(m, device=DEVICE) if with_weight else None
    want_h = swiglu_module.swiglu_reference(gate.contiguous(), up.contiguous(), w)
    _close(kernels.swiglu_forward(gate, up, w), want_h, tol)
    dh = torch.randn(m, h, device=DEVICE).to(dtype)
    dgu, dw, out = kernels.swiglu_backward_gate_up(gate_up, w, dh, want_output=True)
    assert dgu.shape == (m, 2 * h) and dgu.dtype == dtype
    want_dg, want_du, want_dw, want_out = swiglu_module._backward_torch(gate.contiguous(), up.contiguous(), w, dh, True)
    _close(dgu[:, :h], want_dg, tol)
    _close(dgu[:, h:], want_du, tol)
    _close(out, want_out, tol)
    assert (dw is None) == (want_dw is None)
    if dw is not None:
        _close(dw, want_dw, tol)
    monkeypatch.setattr(swiglu_module, "use_fused_kernels", lambda t: False)  # the torch path of the same layout
    torch_dgu, _, _ = swiglu_module.swiglu_backward_gate_up(gate_up, w, dh)
    _close(dgu, torch_dgu, tol)
    split = kernels.swiglu_backward(gate, up, w, dh)
    assert torch.equal(dgu[:, :h], split[0]) and torch.equal(dgu[:, h:], split[1])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_gather_sum_kernel_matches_torch(dtype, tol):
    n_src, n_tok, k, c = 11, 6, 3, 20
    src = torch.randn(n_src, c, device=DEVICE).to(dtype)
    index = torch.randint(0, n_src + 1, (n_tok, k), device=DEVICE)  # n_src = a dropped slot
    w = torch.rand(n_tok, k, device=DEVICE)
    for weight in (None, w):
        got = kernels.gather_sum(src, index, weight)
        src64 = torch.cat([src.double(), torch.zeros(1, c, dtype=torch.float64, device=DEVICE)])
        want = (src64[index] * (1 if weight is None else weight.double()[..., None])).sum(1)
        assert got.dtype == dtype
        _close(got, want, tol)


@pytest.mark.parametrize("capacity_factor", [0.0, 0.75])
def test_layer_with_kernels_matches_reference(monkeypatch, capacity_factor):
    """The fused paths wired into the layer (forced on for CPU tensors under the interpreter)."""
    monkeypatch.setattr(swiglu_module, "use_fused_kernels", lambda t: True)
    monkeypatch.setattr(permute_module, "use_fused_kernels", lambda t: True)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8, capacity_factor=capacity_factor, norm_topk_prob=False)
    layer = MoELayer(16, cfg).to(DEVICE).train()
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 5, 16, device=DEVICE)
    y, _ = layer(x)
    grads = torch.autograd.grad((y * g).sum(), [x] + list(layer.parameters()))
    ry = reference_moe_forward(layer, x)
    rgrads = torch.autograd.grad((ry * g).sum(), [x] + list(layer.parameters()))
    tol = 1e-5 if DEVICE == "cpu" else 1e-4  # GPU GEMMs may reorder sums
    _close(y, ry, tol)
    for a, b in zip(grads, rgrads):
        _close(a, b, tol)


def _routed(counts, N=20, C=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(sum(counts))
    x = torch.randn(N, C, generator=g)
    token = torch.randint(0, N, (n,), generator=g)  # any source rows, repeats included
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    return g, x, token, offs


def _per_expert(offs):
    bounds = [0, *offs.tolist()]
    return list(zip(bounds[:-1], bounds[1:]))


# tiles of 16 under the interpreter: expert 0 one partial tile, 1 none, 2 three (the last partial), 3 one
COUNTS = [5, 0, 37, 3]
# each launch config of the autotune list on its own (the autotuner's pick depends on timing; a 4-warp config of
# the dqkwg kernel once computed wrong gradients in bf16 on the H100); bf16 on the GPU only (the interpreter's is not)
DTYPES = [pytest.param(torch.float32, 1e-5 if DEVICE == "cpu" else 5e-3, id="fp32"),  # the GPU's fp32 dots: tf32
          pytest.param(torch.bfloat16, 2e-2, id="bf16",
                       marks=pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tiles on the GPU"))]


def _one_config_at_a_time(kernel, monkeypatch):
    for config in list(kernel.configs):
        monkeypatch.setattr(kernel, "configs", [config])  # one config: run as is, no timing
        yield config


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("layout", ["stacked", "transposed_view"])
@pytest.mark.parametrize("gather", [True, False])
def test_gathered_grouped_mm_matches_the_expert_loop(layout, gather, dtype, tol, monkeypatch):
    """x[token[r]] @ w[e]^T per expert (x[r] without token), w [E, out, C] stacked or a transposed view of [E, C, out]
    (how backward reads the down projection), against the float64 loop on the same rounded values."""
    g, x, token, offs = _routed(COUNTS)
    if not gather:
        x = x[token]
    out = 40
    x = x.to(dtype)
    w = torch.randn(len(COUNTS), out, x.shape[1], generator=g).to(dtype)
    if layout == "transposed_view":
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    rows = x[token] if gather else x
    want = torch.cat([rows[s:e].double() @ w[i].double().T for i, (s, e) in enumerate(_per_expert(offs))])
    tok = token.to(DEVICE) if gather else None
    for config in _one_config_at_a_time(kernels._gathered_grouped_mm_kernel, monkeypatch):
        got = kernels.gathered_grouped_mm(x.to(DEVICE), tok, offs.to(DEVICE), w.to(DEVICE)).cpu()  # .to keeps strides
        assert got.shape == (len(token), out) and got.dtype == dtype
        assert ((got.double() - want).norm() / want.norm()).item() < tol, str(config)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("into_view", [False, True])
def test_gathered_grouped_wgrad_matches_the_expert_loop(into_view, dtype, tol, monkeypatch):
    """g[rows of e]^T @ x[token[rows of e]] per expert: an empty expert gets zeros, a multi-block expert sums its
    blocks; written into a fresh [E, out, C] tensor or through the transposed view of a [E, C, out] one."""
    gen, x, token, offs = _routed(COUNTS, seed=1)
    out_w = 40
    grad = torch.randn(len(token), out_w, generator=gen).to(dtype)
    x = x.to(dtype)
    want = torch.stack([grad[s:e].double().T @ x[token[s:e]].double() for s, e in _per_expert(offs)])
    args = [t.to(DEVICE) for t in (grad, x, token, offs)]
    for config in _one_config_at_a_time(kernels._gathered_grouped_wgrad_kernel, monkeypatch):
        if into_view:
            target = torch.full((len(COUNTS), x.shape[1], out_w), float("nan"), device=DEVICE, dtype=dtype)
            kernels.gathered_grouped_wgrad(*args, out=target.transpose(1, 2))
            got = target.transpose(1, 2).cpu()
        else:
            got = kernels.gathered_grouped_wgrad(*args).cpu()
        assert got.shape == (len(COUNTS), out_w, x.shape[1]) and torch.equal(got[1], torch.zeros_like(got[1]))
        assert ((got.double() - want).norm() / want.norm()).item() < tol, str(config)


def test_fused_gather_backend_names_what_it_needs(monkeypatch):
    from linear_moe.moe import experts

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="'fused_gather' runs Triton kernels on CUDA tensors, got a cpu tensor"):
            experts._fused_gather_kernels(torch.zeros(2, 2))
    monkeypatch.setattr(experts, "fused_kernels", lambda: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="'fused_gather' needs Triton"):
        experts._fused_gather_kernels(torch.zeros(2, 2, device=DEVICE))
