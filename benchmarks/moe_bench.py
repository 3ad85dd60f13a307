"""The MoE layer of the A0.3B-2B preset (hidden 1024, 64 experts top-8, expert width 896) at 16K tokens,
forward + backward in bf16, against a dense SwiGLU of the same active FLOPs (width 8 × 896) and against a
per-expert loop (how HF transformers' Qwen2-MoE block computes experts), in one run.

    python benchmarks/moe_bench.py [--tokens 16384] [--profile] [--autocast] [--skip-loop] [--graph] [--fused-gather] [--recompute]
    python benchmarks/moe_bench.py --device cpu --tokens 256 --skip-loop     # dry run off the GPU

Writes ``$OUT/moe_bench.json`` (or ``benchmarks/results/``): device, versions, commit, shapes, times,
FLOP rates, activation memory saved for backward and peak memory of one fwd+bwd, and the targets (≥ 0.8× the dense
layer's FLOP rate, ≥ 5× the loop). ``--graph`` also times the grouped and dense layers' fwd+bwd replayed as CUDA
graphs, as the trainer runs its steps: the eager grouped layer's GPU sat idle 0.28 of its 5.72 ms between ~100
kernel launches on the H100 (s7), the dense layer launches a handful. The targets then read the graphed pair.
``--fused-gather`` adds the same layer on the expert backend ``fused_gather`` (Triton GEMMs that read the routed
rows by index: no gathered copies), eager and, with ``--graph``, graphed; ``--recompute`` adds it with
``moe.expert_recompute=True`` (backward re-gathers the rows and recomputes the SwiGLU output: less memory).
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
from linear_moe.train.cuda_graph import capture  # noqa: E402

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
            out.index_add_(0, token, (y * w[token, slot, None].to(y.dtype)).to(out.dtype))
        return out.view_as(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clear_grads(x) -> None:
    for t in _params + [x]:
        t.grad = None


def fwd_bwd(fn, x) -> None:
    """One training-like step of the layer: gradients start empty, as after the trainer's zero_grad(set_to_none=True).
    Accumulating into them instead added a full read-add-write of every weight gradient per step (0.41 ms on the
    H100 for the 64 experts' 176M weights, 8x the dense layer's), a cost training without accumulation never pays."""
    _clear_grads(x)
    fn(x).float().sum().backward()


def bench(step, device: torch.device, n_warm=3, n=10) -> float:
    """Seconds per call of ``step()`` (one fwd+bwd), after ``n_warm`` untimed calls."""
    for _ in range(n_warm):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / n


def graphed_step(fn, x):
    """``fwd_bwd(fn, x)`` captured once as a CUDA graph: returns its replay (same x, gradients rewritten in place).
    Three warm-up runs first (the MoE layer's one-time grouped_mm probe and Triton autotuning among them)."""
    return capture(lambda: fwd_bwd(fn, x), warmup=3)


def saved_activation_mib(fn, x) -> float:
    """MiB of tensors autograd keeps for backward in one forward (parameters excluded, shared storage once)."""
    params = {p.untyped_storage().data_ptr() for p in _params}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t.detach()

    # pack returns a detached alias: handing back t itself would tie a saved output to its own grad_fn, a
    # reference cycle that kept this never-backpropagated graph, and the AccumulateGrad nodes made on the
    # default stream, alive; the graphed rows' capture later failed on them (2026-11-25, s10)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    return sum(seen.values()) / 2**20


def peak_memory_mib(fn, x) -> float | None:
    """Peak CUDA memory of one fwd+bwd above what was allocated before it (None off CUDA)."""
    if x.device.type != "cuda":
        return None
    _clear_grads(x)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(x).float().sum().backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


_params: list[torch.Tensor] = []


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a quick dry run with small --tokens")
    p.add_argument("--autocast", action="store_true", help="fp32 weights under bf16 autocast (how training runs)")
    p.add_argument("--iters", type=int, default=10, help="timed fwd+bwd steps per row (after 3 warm-up steps)")
    p.add_argument("--skip-loop", action="store_true", help="leave out the per-expert loop (slow)")
    p.add_argument("--profile", action="store_true", help="print the grouped layer's top kernels for one fwd+bwd")
    p.add_argument("--graph", action="store_true", help="also time the grouped and dense layers as CUDA graphs (CUDA)")
    p.add_argument("--fused-gather", action="store_true", help="also time the layer on expert backend fused_gather")
    p.add_argument("--recompute", action="store_true",
                   help="also time the layer with moe.expert_recompute=True (rows re-gathered, SwiGLU output recomputed in backward)")
    args = p.parse_args()
    if args.graph and args.device != "cuda":
        raise SystemExit(f"--graph captures CUDA graphs: it needs --device cuda, got --device {args.device}")
    device = torch.device(args.device)
    C, E, K, H = 1024, 64, 8, 896
    cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden_size=H, norm_topk_prob=False, aux_loss_coef=0.01)
    wdtype = torch.float32 if args.autocast else torch.bfloat16
    moe = MoELayer(C, cfg).to(device, wdtype)
    dense = SwiGLUMLP(C, K * H).to(device, wdtype)
    _params.extend(list(moe.parameters()) + list(dense.parameters()))
    loop = LoopMoE(moe)
    x = torch.randn(1, args.tokens, C, device=device, dtype=wdtype, requires_grad=True)
    active_flops = 3 * 2 * args.tokens * 3 * C * K * H  # fwd + bwd of three expert matmuls, top-k experts per token

    def amp(fn):
        if not args.autocast:
            return fn
        return lambda t: _autocast_call(fn, t, device)

    def on_backend(name, recompute=cfg.expert_recompute):
        def run(t):  # the same layer and weights; backend and recompute are read when the layer runs (or is captured)
            moe.experts.backend, moe.experts.recompute = name, recompute
            return moe(t)[0]
        return run

    rows = {}
    cases = [("moe_grouped", on_backend(cfg.expert_backend)), ("dense_same_active_flops", dense)]
    if args.fused_gather:
        cases.append(("moe_fused_gather", on_backend("fused_gather")))
    if args.recompute:
        cases.append(("moe_grouped_recompute", on_backend(cfg.expert_backend, recompute=True)))
    if not args.skip_loop:
        cases.append(("moe_loop", loop))
    if args.graph:  # the loop reads its routing on the host (torch.where): not capturable
        cases += [(f"{name}@graph", fn) for name, fn in cases if name != "moe_loop"]
    for name, fn in cases:
        fn = amp(fn)
        step = graphed_step(fn, x) if name.endswith("@graph") else (lambda fn=fn: fwd_bwd(fn, x))
        dt = bench(step, device, n_warm=min(3, args.iters), n=args.iters)
        rows[name] = {"ms": 1e3 * dt, "tflops": active_flops / dt / 1e12,
                      "saved_activations_mib": saved_activation_mib(fn, x), "peak_memory_mib": peak_memory_mib(fn, x)}
        peak = rows[name]["peak_memory_mib"]
        print(f"{name:32s} {1e3 * dt:8.2f} ms  {active_flops / dt / 1e12:7.1f} TFLOP/s (expert FLOPs)  "
              f"saved {rows[name]['saved_activations_mib']:8.1f} MiB  peak {'-' if peak is None else f'{peak:.1f}'} MiB", flush=True)
    tag = "@graph" if args.graph else ""
    vs_dense = rows[f"moe_grouped{tag}"]["tflops"] / rows[f"dense_same_active_flops{tag}"]["tflops"]
    vs_loop = rows["moe_loop"]["ms"] / rows["moe_grouped"]["ms"] if "moe_loop" in rows else None
    env = environment() if device.type == "cuda" else {"device": "cpu", "torch": torch.__version__}
    result = {"environment": env, "shape": {"tokens": args.tokens, "hidden": C, "experts": E, "top_k": K, "expert_width": H},
              "autocast": args.autocast, "rows": rows, "targets_read": f"moe_grouped{tag} vs dense_same_active_flops{tag}",
              "grouped_vs_dense_flop_rate": vs_dense,
              "fused_gather_vs_dense_flop_rate": (rows[f"moe_fused_gather{tag}"]["tflops"]
                                                  / rows[f"dense_same_active_flops{tag}"]["tflops"]
                                                  if args.fused_gather else None),
              "recompute_vs_dense_flop_rate": (rows[f"moe_grouped_recompute{tag}"]["tflops"]
                                               / rows[f"dense_same_active_flops{tag}"]["tflops"] if args.recompute else None),
              "grouped_speedup_vs_loop": vs_loop,
              "targets": {"vs_dense>=0.8": vs_dense >= 0.8, "vs_loop>=5": None if vs_loop is None else vs_loop >= 5}}
    if args.profile and device.type == "cuda":
        result["top_kernels"] = top_kernels(lambda: fwd_bwd(amp(on_backend(cfg.expert_backend)), x), 25)
        for name, ms, calls in result["top_kernels"]:
            print(f"{ms:9.3f} ms {calls:5d}x  {name}")
        if args.recompute:
            result["top_kernels_recompute"] = top_kernels(lambda: fwd_bwd(amp(on_backend(cfg.expert_backend, True)), x), 25)
    loop_note = "" if vs_loop is None else f", {vs_loop:.1f}x faster than the loop"
    print(f"grouped MoE at {vs_dense:.2f}x the dense FLOP rate{loop_note}")
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_bench.json").write_text(json.dumps(result, indent=1))


def _autocast_call(fn, t, device):
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return fn(t)


if __name__ == "__main__":
    main()
