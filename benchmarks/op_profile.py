"""Where one primitive's fwd+bwd time goes: our fast form beside fla's own kernels at one shape, with the top
GPU kernels of ours. Written to find why RWKV6 on chunk_gla (k, v and decay shifted) measured 15.9 ms where
chunk_gla alone took 7.3; for RWKV6 it also times the query-shifted route (LINEAR_MOE_RWKV6_CHUNK).

    python benchmarks/op_profile.py [--case rwkv6] [--T 32768] [--B 1] [--top 14]

Prints the times (ms, the median of ``ops_bench.bench_ms``, as the ops table times them) and the kernel
table; writes nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from model_bench import top_kernels  # noqa: E402
from ops_bench import bench_ms, make_inputs, run_public  # noqa: E402


def fwd_bwd(call, inputs: dict):
    leaves = {k: v.detach().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}

    def run():
        o, s = call(**leaves)
        (o.float().sum() + (s.sum() if s is not None else 0)).backward()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="rwkv6")
    p.add_argument("--T", type=int, default=32768)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--top", type=int, default=14)
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = make_inputs(args.case, args.B, args.T, 16, 128, 128, torch.bfloat16, "cuda", gen)
    rows = {"ours (backend fla)": lambda **a: run_public(args.case, a, "fla", None)}
    if args.case == "rwkv6":
        from fla.ops.gla import chunk_gla
        from fla.ops.rwkv6 import chunk_rwkv6

        def fla_rwkv6(q, k, v, log_decay, bonus, initial_state):
            return chunk_rwkv6(q, k, v, log_decay.float(), bonus.to(q.dtype), initial_state=initial_state.float(),
                               output_final_state=True)

        def fla_gla(q, k, v, log_decay, bonus, initial_state):
            return chunk_gla(q, k, v, log_decay.float(), initial_state=initial_state.float(), output_final_state=True)

        rows.update({"ours, chunk_gla_shifted_q route": lambda **a: run_public("rwkv6_shifted_q", a, "fla", None),
                     "fla chunk_rwkv6": fla_rwkv6, "fla chunk_gla (no bonus)": fla_gla})
    for name, call in rows.items():
        print(f"{name:32s} {bench_ms(fwd_bwd(call, x)):8.2f} ms", flush=True)
    ours = fwd_bwd(rows["ours (backend fla)"], x)
    for name, ms, calls in top_kernels(ours, args.top):  # the default route's kernels
        print(f"  {ms:8.2f} ms {calls:5d}x  {name}")


if __name__ == "__main__":
    main()
