"""Helpers shared by the layer tests: fresh random generators, jittered mixers, error measures, a
float64 short convolution for the step-by-step references, and the CUDA-vs-CPU harness.

Nothing here calls ``linear_moe.ops`` or the layers' helpers, so a shared bug cannot hide in it.
"""
from __future__ import annotations

import torch

from linear_moe.layers import AttentionConfig, MixerConfig, build_mixer


def generator() -> torch.Generator:
    """A fresh seed per test (a seeded generator each, never one fixed lucky seed)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))


def jittered(module: torch.nn.Module, g: torch.Generator, scale: float = 0.2) -> torch.nn.Module:
    """Move every parameter off its init (norm weights of 1, zero LoRAs and biases, ...) so each one matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius norms) in float64."""
    b = b.double()
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def float64_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters by name, detached, as float64."""
    return {n: p.detach().double() for n, p in module.named_parameters()}


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                silu: bool = True) -> torch.Tensor:
    """Causal depthwise convolution, one token at a time: ``y_t = Σ_i w[:, i] x_{t-W+1+i} (+ b)``, zeros
    before the start, then SiLU if ``silu``. x ``[..., time, channels]``, weight ``[channels, W]``."""
    T, W = x.shape[-2], weight.shape[1]
    y = torch.zeros_like(x)
    for t in range(T):
        for i in range(W):
            s = t - W + 1 + i
            if s >= 0:
                y[..., t, :] += weight[:, i] * x[..., s, :]
    if bias is not None:
        y = y + bias
    return y / (1 + torch.exp(-y)) if silu else y


# ---- CUDA against the CPU torch path ---------------------------------------------------------------

CUDA_HIDDEN, CUDA_T = 64, 150  # a partial last chunk on purpose


def cuda_pair(name: str, cfg: MixerConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same jittered mixer twice: on the CPU, and on CUDA (whatever backend "auto" picks there)."""
    cpu = build_mixer(name, CUDA_HIDDEN, cfg, AttentionConfig(num_heads=2), 1, 3)
    with torch.no_grad():
        for p in cpu.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gpu = build_mixer(name, CUDA_HIDDEN, cfg, AttentionConfig(num_heads=2), 1, 3).cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def check_cuda_matches_cpu_and_decodes(name: str, cfg: MixerConfig, cu_seqlens: list[int]) -> None:
    """Full forward, packed documents and prefill + token-by-token decode on CUDA equal the CPU forward."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, gpu = cuda_pair(name, cfg)
    x = torch.randn(2, CUDA_T, CUDA_HIDDEN)
    cu = torch.tensor(cu_seqlens)
    with torch.no_grad():
        ref, _ = cpu(x)
        y, _ = gpu(x.cuda())
        assert rel_err(y.cpu(), ref) < 1e-3
        packed_ref, _ = cpu(x[:1], cu_seqlens=cu)
        packed, _ = gpu(x[:1].cuda(), cu_seqlens=cu.cuda())
        assert rel_err(packed.cpu(), packed_ref) < 1e-3
        prefill, state = gpu(x[:, :CUDA_T - 3].cuda())
        steps = [prefill]
        for t in range(CUDA_T - 3, CUDA_T):
            out, state = gpu(x[:, t:t + 1].cuda(), state)
            steps.append(out)
        assert rel_err(torch.cat(steps, 1).cpu(), ref) < 1e-3


def check_cuda_bf16_forward_backward(name: str, cfg: MixerConfig, tol: float = 5e-2) -> None:
    """bf16 on CUDA keeps its dtype, stays within ``tol`` of fp32, and gives finite gradients to every
    parameter (with the mixer's aux loss, if it has one)."""
    _, gpu = cuda_pair(name, cfg)
    x = torch.randn(2, CUDA_T, CUDA_HIDDEN, device="cuda")
    with torch.no_grad():
        ref, _ = gpu(x)
    low = gpu.to(torch.bfloat16).train()
    y, _ = low(x.bfloat16().requires_grad_())
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), ref) < tol
    loss = y.float().square().mean()
    if getattr(low, "aux_loss", None) is not None:
        loss = loss + low.aux_loss
    loss.backward()
    for pname, p in low.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
