"""Part-1 linear mixers on CUDA (whatever backend "auto" picks there, fla when installed) held to the CPU
torch path; bf16 forward/backward stays close to fp32. Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

from linear_moe.layers import AttentionConfig, MixerConfig, build_mixer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HIDDEN, T = 64, 150  # a partial last chunk on purpose
CASES = {
    "linear_attention": {}, "lasp2": {}, "retention": {}, "lightning_attention": {}, "gla": {},
    "deltanet": {}, "gated_deltanet": {}, "mamba2": dict(state_size=16),
}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _pair(name, **extra):
    cfg = MixerConfig(num_heads=2, **{**CASES[name], **extra})
    cpu = build_mixer(name, HIDDEN, cfg, AttentionConfig(num_heads=2), 1, 3)
    with torch.no_grad():
        for p in cpu.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gpu = build_mixer(name, HIDDEN, cfg, AttentionConfig(num_heads=2), 1, 3).cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_matches_cpu_and_decodes(name):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, gpu = _pair(name)
    x = torch.randn(2, T, HIDDEN)
    cu = torch.tensor([0, 40, 150])
    with torch.no_grad():
        ref, _ = cpu(x)
        y, state = gpu(x.cuda())
        assert rel_err(y.cpu(), ref) < 1e-3
        packed_ref, _ = cpu(x[:1], cu_seqlens=cu)
        packed, _ = gpu(x[:1].cuda(), cu_seqlens=cu.cuda())
        assert rel_err(packed.cpu(), packed_ref) < 1e-3
        prefill, state = gpu(x[:, :T - 3].cuda())
        steps = [prefill]
        for t in range(T - 3, T):
            out, state = gpu(x[:, t:t + 1].cuda(), state)
            steps.append(out)
        assert rel_err(torch.cat(steps, 1).cpu(), ref) < 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_bf16_forward_backward(name):
    cpu, gpu = _pair(name)
    x = torch.randn(2, T, HIDDEN, device="cuda")
    ref, _ = gpu(x)
    low = gpu.to(torch.bfloat16)
    xb = x.bfloat16().requires_grad_()
    y, _ = low(xb)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), ref) < 5e-2
    y.float().square().mean().backward()
    for pname, p in low.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
