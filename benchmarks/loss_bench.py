"""The LM head's loss at the A0.3B-2B shape (hidden 1024, vocabulary 151936), forward + backward under bf16
autocast with fp32 weights (as training runs it), in one run: the fused loss with its Triton softmax kernel,
the fused loss with the PyTorch softmax passes, the checkpointed form, and full-logits ``F.cross_entropy``.

    python benchmarks/loss_bench.py [--tokens 8192] [--chunk 8192]
    python benchmarks/loss_bench.py --device cpu --tokens 64 --vocab 1000     # dry run off the GPU

Prediction (H100): the three head GEMMs of 8K tokens take ~12 ms at ~600 TFLOP/s; the PyTorch softmax
passes move ~30 GB (~11 ms), the kernel ~7.5 GB (~3 ms): ~23 ms against ~15 ms per 8K tokens.
Writes ``$OUT/loss_bench.json`` (or ``benchmarks/results/``): device, versions, commit, shape, times, memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from linear_moe.ops import cross_entropy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_bench import environment  # noqa: E402
from ops_bench import bench_ms, env_var  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="", help="output folder (default $OUT, else benchmarks/results/)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, device=device, generator=g, requires_grad=True)
    w = (torch.randn(args.vocab, args.hidden, device=device, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=g)

    def step(kind):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                if kind == "full_logits":
                    loss = F.cross_entropy(F.linear(x, w).float(), labels)
                else:
                    loss = cross_entropy.linear_cross_entropy(x, w, labels, args.chunk, fused=kind != "checkpointed")
            loss.backward()
            x.grad = w.grad = None
            return loss.detach()
        return run

    rows = {}
    for kind in ("fused+kernel", "fused+torch", "checkpointed", "full_logits"):
        # the kernel is opt-in until its GPU run is recorded: on for its own row only
        with env_var("LINEAR_MOE_CE_KERNEL", "1" if kind == "fused+kernel" else "0"):
            rows[kind] = _measure(step(kind), device)
        print(f"{kind:14s} {_describe(rows[kind])}", flush=True)
    env = environment() if device.type == "cuda" else {"device": "cpu", "torch": torch.__version__}
    result = {"environment": env, "shape": vars(args), "rows": rows}
    out = Path(args.out or os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_bench.json").write_text(json.dumps(result, indent=1))
    return rows


def _measure(run, device: torch.device) -> dict:
    """Time (CUDA) or just run (CPU) one form's fwd+bwd: ms, peak memory, the loss, or the error it raised."""
    try:
        ms = peak = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            ms = bench_ms(run)
            peak = torch.cuda.max_memory_allocated() / 2**30
        return {"ms": ms, "peak_gib": peak, "loss": float(run())}
    except Exception as e:  # e.g. full logits out of memory at large --tokens: keep the other rows
        return {"error": repr(e)[:300]}


def _describe(row: dict) -> str:
    if "error" in row:
        return row["error"]
    ms = "-" if row["ms"] is None else f"{row['ms']:.2f}"
    peak = "" if row["peak_gib"] is None else f"  peak {row['peak_gib']:.1f} GiB"
    return f"{ms:>8s} ms  loss {row['loss']:.5f}{peak}"


if __name__ == "__main__":
    main()
