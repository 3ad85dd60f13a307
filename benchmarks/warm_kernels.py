"""Fill Triton's autotuning cache for the A0.3B-2B mixer shapes, mixer by mixer, and say how long each took.

fla's Triton kernels autotune on first use: every kernel compiles and times a dozen or more configs,
which costs minutes per mixer on a fresh machine (the first GPU benchmark runs here spent their whole
budget in it). The tuned choice is keyed by head count and head dims, not by sequence length, so one
fwd+bwd per mixer at a short length tunes every length. With ``TRITON_CACHE_DIR`` pointing at a folder
that outlives the machine, later processes start tuned:

    TRITON_CACHE_DIR=$PWD/.triton-cache python benchmarks/warm_kernels.py --mixers gated_deltanet,gla

``--pack FILE`` writes the cache's autotuning results (the small ``*.autotune.json`` files; compiled
binaries are rebuilt quickly) into a tarball to carry to the next machine; ``--unpack FILE`` restores it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from linear_moe.layers import build_mixer  # noqa: E402
from linear_moe.model.config import ModelConfig  # noqa: E402
from linear_moe.ops.backends.tuning import triton_cache_dir as cache_dir, unpack_autotune_results  # noqa: E402

DEFAULT_MIXERS = ("gated_deltanet,gla,attention,deltanet,linear_attention,retention,lightning_attention,mamba2,"
                  "rwkv6,hgrn2,gsa,based,rebased,lasp2,mom_gla,mom_gated_deltanet")


def pack(path: Path) -> int:
    """Write the cache's autotuning results to ``path`` whole or not at all (a temporary file, then a rename: a
    call cut mid-write keeps the last tarball); an empty cache leaves an existing tarball alone (a pack from
    another TRITON_CACHE_DIR once replaced 446 results with none, 2026-11-25 s10)."""
    files = sorted(cache_dir().rglob("*.autotune.json"))
    if not files and path.exists():
        return 0
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=str(f.relative_to(cache_dir())))
    tmp.replace(path)
    return len(files)


def unpack(path: Path) -> int:
    return unpack_autotune_results(path, cache_dir(), overwrite=True) if path.exists() else 0


def warm(name: str, T: int, B: int) -> dict:
    cfg = ModelConfig.from_preset("A0.3B-2B", base_model="qwen2", mixer=name, layer_pattern="L" * 12)
    layer = build_mixer(name, cfg.hidden_size, cfg.mixer_options, cfg.attention, 0, cfg.num_layers).cuda()
    x = torch.randn(B, T, cfg.hidden_size, device="cuda", requires_grad=True)

    def fwd_bwd() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(x)
        y.float().square().mean().backward()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    first, second = fwd_bwd(), fwd_bwd()  # the first one compiles and tunes
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # the one-token decode kernels too
        _, state = layer(x[:1, :16].detach())
        layer(x[:1, 16:17].detach(), state=state)
    torch.cuda.synchronize()
    return {"mixer": name, "first_s": round(first, 1), "second_ms": round(1e3 * second, 2),
            "decode_first_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mixers", default=DEFAULT_MIXERS)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new mixer after this many seconds")
    p.add_argument("--pack", default="", help="write the autotuning results to this tarball at the end")
    p.add_argument("--unpack", default="", help="restore autotuning results from this tarball first")
    args = p.parse_args()
    if args.unpack:
        print(f"restored {unpack(Path(args.unpack))} autotuning results into {cache_dir()}", flush=True)
    start, rows = time.perf_counter(), []
    for name in [m for m in args.mixers.split(",") if m]:
        if time.perf_counter() - start > args.budget_s:
            rows.append({"mixer": name, "skipped": "budget"})
            continue
        try:
            rows.append(warm(name, args.length, args.batch))
        except Exception as e:  # one mixer failing must not stop the others from tuning
            rows.append({"mixer": name, "error": repr(e)[:300]})
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    if args.pack:
        print(f"packed {pack(Path(args.pack))} autotuning results into {args.pack}", flush=True)


if __name__ == "__main__":
    main()
