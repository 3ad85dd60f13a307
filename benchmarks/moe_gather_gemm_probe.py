"""Can one Triton grouped GEMM that gathers its own input rows beat a row gather plus torch's cutlass grouped GEMM?

Issue 5's MoE layer is at 0.72x the dense layer's FLOP rate (target 0.8x) on the H100: its six grouped GEMMs
(``torch._grouped_mm``, cutlass, ~650 TFLOP/s) take 3.33 of 5.72 ms and three row gathers into expert order take
0.47 ms, each at about the bandwidth its bytes need. A gather can only go away inside the GEMM that reads it,
which ``torch._grouped_mm`` offers no hook for. This probe answers the question that decides whether writing such
a kernel for the layer is worth it, on the first GEMM of the layer at its real shape (16K tokens x top-8 =
131072 rows, hidden 1024 -> gate+up 1792, 64 experts):

    forward ("fwd"):   out[r] = x[token[r]] @ W[e]^T
        gather + cutlass:  torch._grouped_mm(x[token], W^T, offs)
        fused:             gathered_grouped_mm(x, token, offs, W)       rows loaded by index, no [n, C] copy
                           (linear_moe/moe/kernels.py, the expert backend "fused_gather")
    weight gradient ("wgrad"):  dW[e] = G[rows of e]^T @ x[token[rows of e]]
        gather + cutlass:  torch._grouped_mm(G^T, x[token], offs)
        fused:             gathered_grouped_wgrad(G, x, token, offs)    the reduction's rows loaded by index

The layer's three gathers feed one GEMM of each kind (forward, its recompute for the gate/up weight gradient, and
the combine's backward for the down projection), so both must win for the gathers to go. Predicted on the H100:
cutlass 0.74 ms each (481 GFLOP at ~650 TFLOP/s) + gather 0.16 ms = 0.90 ms; a fused kernel breaks even at ~535
TFLOP/s. Triton cannot use TMA for gathered rows on sm90, so it is expected near 500-600.

    python benchmarks/moe_gather_gemm_probe.py                   # on the GPU
    python benchmarks/moe_gather_gemm_probe.py --device cpu --tokens 64 --experts 4 --hidden 32 --out-width 48
                                                                 # Triton interpreter dry run

Writes ``$OUT/moe_gather_gemm_probe.json`` (or ``benchmarks/results/``): environment, shape, both times, TFLOP/s and
the fused result's relative error against the gather + grouped_mm result.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_commit, source_digest  # noqa: E402

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from linear_moe.moe.kernels import (  # noqa: E402
    _gathered_grouped_mm_kernel,
    _gathered_grouped_wgrad_kernel,
    gathered_grouped_mm,
    gathered_grouped_wgrad,
)

def reference_wgrad(g, x, token, offs) -> torch.Tensor:
    """dW expert by expert in float64 (host loop: a reference only)."""
    bounds = [0, *offs.tolist()]
    return torch.stack([g[s:e].double().T @ x[token[s:e]].double() for s, e in zip(bounds[:-1], bounds[1:])])


def reference(x, token, offs, w) -> torch.Tensor:
    """The same product expert by expert in float64 (host loop: a reference only)."""
    bounds = [0, *offs.tolist()]
    return torch.cat([x[token[s:e]].double() @ w[i].double().T for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))])


def routed_problem(tokens: int, top_k: int, experts: int, hidden: int, out_width: int, device, dtype, seed=0):
    """Random top-k routing of ``tokens`` rows, sorted by expert: (x, token, offs, w, counts)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    w = (torch.randn(experts, out_width, hidden, generator=gen) * hidden ** -0.5).to(device, dtype)
    choice = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=1).indices.reshape(-1)
    order = torch.argsort(choice, stable=True)
    counts = torch.bincount(choice, minlength=experts)
    return x, (order // top_k).to(device), torch.cumsum(counts, 0).to(device, torch.int32), w, counts


def time_ms(fn, device, iters: int) -> float:
    for _ in range(3):
        fn()
    if device.type != "cuda":
        import time
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return 1e3 * (time.perf_counter() - t0) / iters
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / iters


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--out-width", type=int, default=1792, help="gate + up rows of each expert (2 x 896)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="", help="output folder (default $OUT, else benchmarks/results/)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, token, offs, w, counts = routed_problem(a.tokens, a.top_k, a.experts, a.hidden, a.out_width, device, dtype)
    flop = 2 * token.numel() * a.hidden * a.out_width
    grad = (torch.randn(token.numel(), a.out_width, generator=torch.Generator().manual_seed(1))).to(device, dtype)
    rel = lambda got, want: ((got.double().cpu() - want).norm() / want.norm()).item()  # noqa: E731
    cpu = [t.cpu() for t in (x, token, offs, w, grad)]
    fused = {"fwd": lambda: gathered_grouped_mm(x, token, offs, w),
             "wgrad": lambda: gathered_grouped_wgrad(grad, x, token, offs)}
    rows = {"fwd": {"rel_err_vs_float64": rel(fused["fwd"](), reference(*cpu[:4]))},
            "wgrad": {"rel_err_vs_float64": rel(fused["wgrad"](), reference_wgrad(cpu[4], *cpu[:3]))}}
    if device.type == "cuda":
        wt, gathered = w.transpose(-2, -1), x.index_select(0, token)
        cutlass = {"fwd": lambda x_rows: torch._grouped_mm(x_rows, wt, offs=offs),
                   "wgrad": lambda x_rows: torch._grouped_mm(grad.t(), x_rows, offs=offs)}
        gather_ms = time_ms(lambda: x.index_select(0, token), device, a.iters)
        for kind, row in rows.items():
            row["gather_ms"] = gather_ms
            row["grouped_mm_ms"] = time_ms(lambda: cutlass[kind](gathered), device, a.iters)
            row["gather_plus_grouped_mm_ms"] = time_ms(lambda: cutlass[kind](x.index_select(0, token)), device, a.iters)
            row["grouped_mm_tflops"] = flop / row["grouped_mm_ms"] / 1e9
    for kind, row in rows.items():
        row["fused_ms"] = time_ms(fused[kind], device, a.iters)
        row["fused_tflops"] = flop / row["fused_ms"] / 1e9
        if device.type == "cuda":
            row["fused_speedup"] = row["gather_plus_grouped_mm_ms"] / row["fused_ms"]
            kernel = _gathered_grouped_mm_kernel if kind == "fwd" else _gathered_grouped_wgrad_kernel
            row["best_config"] = str(kernel.best_config)
    env = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (Triton interpreter)",
           "torch": torch.__version__, "triton": triton.__version__, "commit": git_commit(),
           "source_digest": source_digest()}
    result = {"environment": env, "shape": {"rows": token.numel(), "tokens": a.tokens, "top_k": a.top_k,
              "experts": a.experts, "hidden": a.hidden, "out_width": a.out_width,
              "empty_experts": int((counts == 0).sum())}, "result": rows}
    for kind, row in rows.items():
        for key, value in row.items():
            print(f"{kind:6s} {key:28s} {value:.4g}" if isinstance(value, float) else f"{kind:6s} {key:28s} {value}",
                  flush=True)
    out = Path(a.out or os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_gather_gemm_probe.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
