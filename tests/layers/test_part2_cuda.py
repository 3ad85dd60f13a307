"""Part-2 mixers on CUDA (whatever backend "auto" picks there) held to the CPU torch path, packed
documents and decoding included; bf16 forward/backward stays close to fp32. Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

from linear_moe.layers import AttentionConfig, MixerConfig, build_mixer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NAMES = ["gsa", "based", "rebased", "rwkv6", "hgrn2", "mom_gla", "mom_gated_deltanet"]
HIDDEN, T = 64, 150  # a partial last chunk on purpose
# ReBased's normaliser Σ (q̃·k̃)² is ill-conditioned where it nears 0; bf16 projections then move a few
# outputs by several percent, so its bf16 check is loose.
BF16_TOL = {"rebased": 0.5}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _pair(name):
    cfg = MixerConfig(num_heads=2, num_slots=8, shared_memory=True)
    cpu = build_mixer(name, HIDDEN, cfg, AttentionConfig(num_heads=2), 1, 3)
    with torch.no_grad():
        for p in cpu.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gpu = build_mixer(name, HIDDEN, cfg, AttentionConfig(num_heads=2), 1, 3).cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu_and_decodes(name):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, gpu = _pair(name)
    x = torch.randn(2, T, HIDDEN)
    cu = torch.tensor([0, 40, 41, 150])
    with torch.no_grad():
        ref, _ = cpu(x)
        y, _ = gpu(x.cuda())
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


@pytest.mark.parametrize("name", NAMES)
def test_cuda_bf16_forward_backward(name):
    _, gpu = _pair(name)
    x = torch.randn(2, T, HIDDEN, device="cuda")
    with torch.no_grad():
        ref, _ = gpu(x)
    low = gpu.to(torch.bfloat16).train()
    xb = x.bfloat16().requires_grad_()
    y, _ = low(xb)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), ref) < BF16_TOL.get(name, 5e-2)
    loss = y.float().square().mean()
    if getattr(low, "aux_loss", None) is not None:
        loss = loss + low.aux_loss
    loss.backward()
    for pname, p in low.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
