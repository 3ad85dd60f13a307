"""Launch overhead of one training step: aten ops dispatched per step (forward / backward / optimizer, by
kind and by name), host time per step at a tiny width, and on CUDA the kernels the profiler counts.

    python benchmarks/overhead_bench.py [--kinds gdn,attention] [--device cpu|cuda] [--width tiny|full]
                                        [--tokens 256] [--precision bf16|fp32] [--cast-weights-once]

At 8K tokens per step the A0.3B-2B step is bound by the host issuing launches (each aten op costs
~10-20 µs of Python and dispatch), so the number of ops per step is what to cut; the host time at a
tiny width on the CPU, where the GPU work is negligible, is a proxy for that cost. ``--width tiny``
keeps the preset's 12 layers, 64 experts top-8 and its layer pattern, at hidden 64.

Prints a table and writes ``overhead_bench.json`` to ``--out``, ``$OUT`` or ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from linear_moe.model.causal_lm import LinearMoEForCausalLM  # noqa: E402
from linear_moe.model.config import ModelConfig  # noqa: E402

KINDS = {  # name -> (mixer, layer pattern), as in model_bench.py
    "gdn": ("gated_deltanet", "L" * 12),
    "gla": ("gla", "L" * 12),
    "hybrid": ("gated_deltanet", "LLLN" * 3),
    "attention": ("attention", "N" * 12),
}
PHASES = ("forward", "backward", "optimizer")
CATEGORIES = ("copy", "elementwise", "matmul", "view", "other")
_COPIES = {"_to_copy", "copy_", "clone", "_copy_from", "_copy_from_and_resize", "to"}
_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_grouped_mm", "grouped_mm", "addmv", "mv",
            "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"}


def op_category(func) -> str:
    """copy (dtype casts and copies) | elementwise (pointwise-tagged) | matmul | view (no kernel) | other."""
    name = func._schema.name.split("::")[-1]
    if name in _COPIES:
        return "copy"
    if name in _MATMULS or "_fused_adam" in name or "scaled_dot_product" in name:
        return "matmul" if "adam" not in name else "other"
    if getattr(func, "is_view", False) or name in ("detach", "alias", "_unsafe_view", "lift_fresh"):
        return "view"
    if torch.Tag.pointwise in func.tags:
        return "elementwise"
    return "other"


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, into ``self.counts[phase][op name]``; ``phase`` is
    switched by the caller. Views are counted too (host cost, no kernel), in their own category."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.counts: dict[str, Counter] = {p: Counter() for p in PHASES}
        self.categories: dict[str, Counter] = {p: Counter() for p in PHASES}
        self.forward_sources: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        self.counts[self.phase][name] += 1
        self.categories[self.phase][op_category(func)] += 1
        if self.phase == "forward":
            self.forward_sources[_source(sys._getframe(1))] += 1
        return func(*args, **(kwargs or {}))


def _source(frame) -> str:
    """Which floor of ``linear_moe`` issued an op: ``ops`` when any frame on the stack is in ``ops/`` (those
    counts depend on the backend: fla's Triton kernels on CUDA, the torch reference on CPU), else the
    innermost of ``layers`` / ``moe``, else the outermost ``linear_moe`` module (``model``, ...)."""
    floors = []
    while frame is not None:
        path = frame.f_code.co_filename
        if "/linear_moe/" in path:
            floors.append(path.rsplit("/linear_moe/", 1)[1].split("/")[0].removesuffix(".py"))
        frame = frame.f_back
    if "ops" in floors:
        return "ops"
    return next((f for f in floors if f in ("layers", "moe")), floors[-1] if floors else "other")


def build_config(kind: str, width: str) -> ModelConfig:
    mixer, pattern = KINDS[kind]
    cfg = ModelConfig.from_preset("A0.3B-2B", base_model="qwen2", mixer=mixer, layer_pattern=pattern)
    if width == "tiny":  # same layers, experts, routing and pattern; everything narrow
        cfg = dataclasses.replace(
            cfg, vocab_size=512, hidden_size=64, intermediate_size=128, max_position_embeddings=4096,
            attention=dataclasses.replace(cfg.attention, num_heads=2),
            moe=dataclasses.replace(cfg.moe, expert_hidden_size=32))
    elif width != "full":
        raise ValueError(f"--width={width!r} is not supported; choose one of: 'tiny', 'full'")
    return cfg


def make_step(model, opt, x, device: torch.device, dtype: torch.dtype | None, counter: OpCounter | None = None,
              grad_accum: int = 1):
    """One training step (``grad_accum`` x (forward + backward), AdamW step, zero_grad); ``counter.phase``
    follows it."""

    def phase(name):
        if counter is not None:
            counter.phase = name

    def step():
        for _ in range(grad_accum):
            phase("forward")
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out = model(x, labels=torch.roll(x, -1, 1), return_logits=False)
            phase("backward")
            (out.loss / grad_accum).backward()
        phase("optimizer")
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def cuda_kernels(step) -> int:
    """Kernels the profiler sees in one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def run_one(kind: str, args, device: torch.device) -> dict:
    cfg = build_config(kind, args.width)
    torch.manual_seed(0)
    model = LinearMoEForCausalLM(cfg).to(device)
    fused = device.type == "cuda" or hasattr(torch, "_fused_adamw_")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    if args.cast_weights_once:
        from linear_moe.moe.experts import cast_expert_weights_once

        cast_expert_weights_once(model, opt)
    B = max(1, args.tokens // args.seq_len)  # per micro-batch
    x = torch.randint(0, cfg.vocab_size, (B, args.seq_len), device=device)
    dtype = None if args.precision == "fp32" else torch.bfloat16
    step = make_step(model, opt, x, device, dtype, grad_accum=args.grad_accum)
    for _ in range(args.warmup):
        step()
    counter = OpCounter()
    with counter:
        make_step(model, opt, x, device, dtype, counter, args.grad_accum)()
    _sync(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    row = {"kind": kind, "B": B, "T": args.seq_len,
           "ops": {p: sum(counter.counts[p].values()) for p in PHASES},
           "by_category": {p: {c: counter.categories[p][c] for c in CATEGORIES} for p in PHASES},
           "top_ops": {p: counter.counts[p].most_common(args.top) for p in PHASES},
           "forward_by_source": dict(counter.forward_sources.most_common()),
           "host_ms": 1e3 * statistics.median(times)}
    row["ops_total"] = sum(row["ops"].values())
    row["kernel_ops_total"] = row["ops_total"] - sum(row["by_category"][p]["view"] for p in PHASES)
    if device.type == "cuda":
        row["cuda_kernels"] = cuda_kernels(step)
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default="gdn,attention")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", default="tiny", help="tiny (hidden 64, same depth / experts) | full (the preset)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches (of --tokens each) per optimizer step")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="bf16: autocast over fp32 weights")
    p.add_argument("--cast-weights-once", action="store_true", help="expert weights cast to bf16 once per step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=12, help="most frequent ops listed per phase")
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for kind in [k for k in args.kinds.split(",") if k]:
        if kind not in KINDS:
            raise ValueError(f"--kinds: {kind!r} is not one of: {', '.join(KINDS)}")
        rows.append(run_one(kind, args, device))
    result = {"environment": {"device": args.device, "torch": torch.__version__,
                              "cuda_device": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
              "args": vars(args), "rows": rows}
    out = Path(args.out or os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead_bench.json").write_text(json.dumps(result, indent=1))
    print(f"\n{'kind':10s} {'phase':10s} {'ops':>6s} " + " ".join(f"{c:>11s}" for c in CATEGORIES))
    for r in rows:
        for p in PHASES:
            cats = " ".join(f"{r['by_category'][p][c]:11d}" for c in CATEGORIES)
            print(f"{r['kind']:10s} {p:10s} {r['ops'][p]:6d} {cats}")
        extra = f", {r['cuda_kernels']} CUDA kernels" if "cuda_kernels" in r else ""
        print(f"{r['kind']:10s} {'total':10s} {r['ops_total']:6d} ({r['kernel_ops_total']} non-view), "
              f"host {r['host_ms']:.1f} ms/step{extra}")
        floors = ", ".join(f"{k} {v}" for k, v in r["forward_by_source"].items())
        print(f"{r['kind']:10s} forward ops by floor: {floors}")
    return result


if __name__ == "__main__":
    main()
