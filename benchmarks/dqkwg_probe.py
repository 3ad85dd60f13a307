"""Which launch configurations of linear-moe's gated backward step (``ops/backends/triton/dqkwg.py``, the fla #640
replacement) are correct at which key widths and dtypes: one child process per (K, heads, dtype, num_warps,
num_stages).

Why: on the H100 (Triton 3.6, 2026-11-25) Mamba2 with ``state_size=16`` in bf16 made an illegal memory access in
this kernel while Triton's autotuner timed its configurations, and the fault took the whole test process with it.
This probe runs each configuration alone (a child process each, so a fault only ends its own row) against
the float64 reference of ``tests/ops/test_backends_dqkwg.py``. On 2026-11-25 (s9) every 4-warp configuration got dk
wrong in bf16 at K = 16 and 32 and every 8-warp one was right: the kernel keeps the 8-warp ones.

    python benchmarks/dqkwg_probe.py                          # on the GPU: K 16/32/64, bf16 and fp32, 4 configs
    python benchmarks/dqkwg_probe.py --device cpu --ks 16 --dtypes float32 --configs 4:2   # interpreter dry run

Writes ``$OUT/dqkwg_probe.json`` (or ``benchmarks/results/``): environment, one row per run (ok / wrong / fault /
timeout, with the relative errors or the error's last line).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from provenance import git_commit, source_digest

ROOT = Path(__file__).resolve().parents[1]
TOL = {"bfloat16": 2e-2, "float32": 5e-3}  # the GPU runs fp32 dots in tf32


def child(K: int, dtype: str, warps: int, stages: int, device: str, H: int = 2, HV: int = 2) -> dict:
    """One kernel run with one configuration; prints and returns the row (run in a fresh process)."""
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests" / "ops")]
    import torch
    import triton

    import linear_moe.ops.backends.triton.dqkwg as dq
    from test_backends_dqkwg import reference, scalar_gate_inputs

    dq._dqkwg_kernel.configs = [triton.Config({}, num_warps=warps, num_stages=stages)]  # one config: no timing
    gen = torch.Generator().manual_seed(0)
    size = dict(B=2, T=150, H=H, HV=HV, V=64, BT=64) if device == "cuda" else dict(B=1, T=37, H=H, HV=HV, V=16, BT=16)
    dt = getattr(torch, dtype)
    q, k, v, do, h, dh, g = scalar_gate_inputs(gen, K, dt, **size)
    BT = size["BT"]
    put = lambda t: t.to(device=device, dtype=dt)  # noqa: E731
    out = dq.chunk_bwd_dqkwg(*map(put, (q, k, v, do, h, dh)), g=g.to(device), scale=K ** -0.5, chunk_size=BT)
    if device == "cuda":
        torch.cuda.synchronize()
    ref = reference(q, k, v, do, h, dh, torch.zeros_like(v), g, None, K ** -0.5, False, None, BT)
    errors = {name: ((got.double().cpu() - want).norm() / want.norm()).item()
              for name, got, want in zip(("dq", "dk", "dg"), (out[0], out[1], out[3]), (ref[0], ref[1], ref[3]))}
    ok = all(e == e and e < TOL[dtype] for e in errors.values())  # e == e: not NaN
    return {"status": "ok" if ok else "wrong", "rel_err": {n: float(f"{e:.3g}") for n, e in errors.items()}}


def run_row(K: int, dtype: str, warps: int, stages: int, device: str, timeout_s: float, H: int = 2,
            HV: int = 2) -> dict:
    row = {"K": K, "H": H, "HV": HV, "dtype": dtype, "num_warps": warps, "num_stages": stages}
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, __file__, "--child", f"{K}:{dtype}:{warps}:{stages}:{H}:{HV}", "--device", device]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode == 0 and lines:
        return {**row, **json.loads(lines[-1])}
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    fault = "illegal memory access" in done.stderr or "CUDA error" in done.stderr
    return {**row, "status": "fault" if fault else "error", "message": tail[:300], "returncode": done.returncode}


def environment(device: str) -> dict:
    import torch
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__,
           "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (Triton interpreter)"}
    env["commit"], env["source_digest"] = git_commit(), source_digest()
    return env


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", default="16,32,64")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--configs", default="4:2,4:3,8:2,8:3", help="num_warps:num_stages pairs (the kernel's autotune list)")
    p.add_argument("--heads", default="2:2,1:2", help="H:HV pairs (key heads : value heads)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--timeout-s", type=float, default=120.0, help="per child process")
    p.add_argument("--out", default="", help="output folder (default $OUT, else benchmarks/results/)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        K, dtype, warps, stages, H, HV = args.child.split(":")
        row = child(int(K), dtype, int(warps), int(stages), args.device, int(H), int(HV))
        print(json.dumps(row), flush=True)
        return row
    for d in args.dtypes.split(","):
        if d not in TOL:
            raise SystemExit(f"--dtypes: {d!r} is not one of {', '.join(TOL)}")
    configs = [tuple(int(n) for n in c.split(":")) for c in args.configs.split(",") if c]
    rows = []
    heads = [tuple(int(n) for n in pair.split(":")) for pair in args.heads.split(",") if pair]
    for K in (int(k) for k in args.ks.split(",")):
        for H, HV in heads:
            for dtype in args.dtypes.split(","):
                for warps, stages in configs:
                    row = run_row(K, dtype, warps, stages, args.device, args.timeout_s, H, HV)
                    rows.append(row)
                    print(f"K={K:4d} H={H} HV={HV} {dtype:9s} warps={warps} stages={stages}  {row['status']:7s} "
                          f"{row.get('rel_err') or row.get('message', '')}", flush=True)
    result = {"environment": environment(args.device), "args": vars(args), "rows": rows}
    out = Path(args.out or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "dqkwg_probe.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
