"""The MoE layer of the A0.3B-2B preset (hidden 1024, 64 experts top-8, expert width 896) at 16K tokens,
forward + backward in bf16, against a dense SwiGLU of the same active FLOPs (width 8 × 896) and against a
per-expert loop (how HF transformers' Qwen2-MoE block computes experts), in one run.

    python benchmarks/moe_bench.py [--tokens 16384]

Writes ``$OUT/moe_bench.json`` (or ``benchmarks/results/``): device, versions, commit, shapes, times,
FLOP rates, and the targets (≥ 0.8× the dense layer's FLOP rate, ≥ 5× the loop).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from linear_moe.moe import MoEConfig, MoELayer, SwiGLUMLP  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_bench import environment, top_kernels  # noqa: E402


class LoopMoE(torch.nn.Module):
    """Experts as a Python loop over experts with index_add (the HF Qwen2-MoE block's way), same weights."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        flat = x.view(-1, x.shape[-1])
        route = self.layer.router(flat)
        idx, w = route.topk_idx, route.topk_weight
        out = torch.zeros_like(flat)
        e = self.layer.experts
        mask = F.one_hot(idx, e.num_experts).permute(2, 1, 0)  # [E, k, N]
        for expert in range(e.num_experts):
            slot, token = torch.where(mask[expert])
            if token.numel() == 0:
                continue
            h = flat[token]
            y = (F.silu(h @ e.gate_proj[expert].T) * (h @ e.up_proj[expert].T)) @ e.down_proj[expert].T
            out.index_add_(0, token, y * w[token, slot, None].to(y.dtype))
        return out.view_as(x)


def bench(fn, x, n_warm=3, n=10) -> float:
    for _ in range(n_warm):
        fn(x).float().sum().backward()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn(x).float().sum().backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--profile", action="store_true", help="print the grouped layer's top kernels for one fwd+bwd")
    args = p.parse_args()
    C, E, K, H = 1024, 64, 8, 896
    cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden_size=H, norm_topk_prob=False, aux_loss_coef=0.01)
    moe = MoELayer(C, cfg).cuda().to(torch.bfloat16)
    dense = SwiGLUMLP(C, K * H).cuda().to(torch.bfloat16)
    loop = LoopMoE(moe)
    x = torch.randn(1, args.tokens, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    active_flops = 3 * 2 * args.tokens * 3 * C * K * H  # fwd + bwd of three expert matmuls, top-k experts per token
    rows = {}
    for name, fn in [("moe_grouped", lambda t: moe(t)[0]), ("dense_same_active_flops", dense), ("moe_loop", loop)]:
        dt = bench(fn, x)
        rows[name] = {"ms": 1e3 * dt, "tflops": active_flops / dt / 1e12}
        print(f"{name:26s} {1e3 * dt:8.2f} ms  {active_flops / dt / 1e12:7.1f} TFLOP/s (expert FLOPs)", flush=True)
    vs_dense = rows["moe_grouped"]["tflops"] / rows["dense_same_active_flops"]["tflops"]
    vs_loop = rows["moe_loop"]["ms"] / rows["moe_grouped"]["ms"]
    result = {"environment": environment(), "shape": {"tokens": args.tokens, "hidden": C, "experts": E, "top_k": K, "expert_width": H},
              "rows": rows, "grouped_vs_dense_flop_rate": vs_dense, "grouped_speedup_vs_loop": vs_loop,
              "targets": {"vs_dense>=0.8": vs_dense >= 0.8, "vs_loop>=5": vs_loop >= 5}}
    if args.profile:
        result["top_kernels"] = top_kernels(lambda: moe(x)[0].float().sum().backward(), 25)
        for name, ms, calls in result["top_kernels"]:
            print(f"{ms:9.3f} ms {calls:5d}x  {name}")
    print(f"grouped MoE at {vs_dense:.2f}x the dense FLOP rate, {vs_loop:.1f}x faster than the loop")
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_bench.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
