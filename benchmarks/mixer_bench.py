"""Every registered token mixer as one layer at the A0.3B-2B width (hidden 1024, 8 heads): forward + backward
in bf16 autocast at several sequence lengths with a fixed number of tokens per step (B = tokens / T), beside
the softmax ``attention`` mixer, in one run.

    python benchmarks/mixer_bench.py [--mixers all] [--lengths 2048,8192,32768] [--tokens 32768]
                                     [--steps 5] [--warmup 2] [--budget-s 480] [--mode auto]
                                     [--profile-lengths 32768] [--host-profile-lengths 32768]
    python benchmarks/mixer_bench.py --device cpu --tiny      # a dry run of the same code on tiny shapes

Columns: ms per fwd+bwd step, tokens/s, speed relative to ``attention`` at the same T (> 1: faster), peak
memory, the kernel backend each primitive actually ran on (recorded from ``resolve_backend`` during a step:
``fla``; ``fla+ours`` where our gated backward kernel replaces fla's on Hopper; ``torch``; attention is
PyTorch SDPA), and an error column: one mixer failing (OOM, missing kernel) never loses the table.
On CUDA each row also records ``host_syncs``: where one step made the host wait for the device (PyTorch's sync
debug mode), which makes ``host_ms`` equal ``ms`` without the host being the bottleneck.
``--host-profile-lengths`` records, at those lengths, where the host's time to issue a step goes (cProfile over a
few steps: the Python functions with the most own time, per step): the question when ``host_ms`` equals ``ms``.
Prints a table and writes ``$OUT/mixer_bench.json`` (or ``benchmarks/results/``), rewritten after every
row so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import json
import os
import platform
import pstats
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_commit, source_digest  # noqa: E402

from linear_moe.layers.config import AttentionConfig  # noqa: E402
from linear_moe.layers.registry import available_mixers, build_mixer  # noqa: E402
from linear_moe.model.config import ModelConfig  # noqa: E402
from linear_moe.ops import backends  # noqa: E402

# The registry's order puts attention mid-table; measure it first so every ratio has its reference.
REFERENCE = "attention"


def environment(device: torch.device) -> dict:
    """model_bench's environment (GPU name, torch / Triton / fla versions, commit), or its CPU equivalent."""
    if device.type == "cuda":
        from model_bench import environment as gpu_environment

        return gpu_environment()
    return {"device": f"cpu ({platform.processor() or platform.machine()})", "torch": torch.__version__,
            "triton": backends.triton_version(), "fla": backends.fla_version(), "commit": git_commit(),
            "source_digest": source_digest()}


class Timer:
    """Elapsed milliseconds of a region: CUDA events on a GPU (no host sync inside), wall clock on the CPU; and
    ``host_ms``, the wall time the host took to issue the region (on a GPU, before waiting for it to finish)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "Timer":
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        # host_ms: the host's time to issue the region's work (before waiting for it). Close to ms: host-bound.
        self.host_ms = (time.perf_counter() - self.t0) * 1e3
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = self.host_ms


@contextlib.contextmanager
def record_backends(seen: dict):
    """Record ``op -> backend`` for every kernel-backend decision made inside the block (the ops look
    ``resolve_backend`` up at call time, so wrapping the module attribute sees every call)."""
    original = backends.resolve_backend

    def recording(op_name, backend=None, device="cpu", dtype=None, **features):
        name = original(op_name, backend, device, dtype, **features)
        label = name
        if (name == "fla" and features.get("requires_grad", True) and backends._uses_dqkwg_gated(op_name, features.get("decay", "none"))
                and backends.hopper_dqkwg_bug(backends.cuda_capability(torch.device(device)), backends.triton_version())):
            label = "fla+ours"  # fla's kernels with our fixed gated backward step (fla #640)
        seen.setdefault(op_name, set()).add(label)
        return name  # the op runs on what it resolved; only the record says more

    backends.resolve_backend = recording
    try:
        yield seen
    finally:
        backends.resolve_backend = original


def describe_backends(mixer: str, seen: dict) -> str:
    if not seen:
        return "torch (SDPA)" if mixer == REFERENCE else "torch"
    return ", ".join(f"{op}:{'/'.join(sorted(names))}" for op, names in sorted(seen.items()))


def host_profile(step, steps: int = 3, top: int = 15) -> list[list]:
    """Where the host's time goes while issuing ``steps`` calls of ``step``: ``[["TOTAL", ms per step], [function,
    own ms per step, calls per step], ...]``, the ``top`` functions by own time (cProfile's tottime; the profiler
    slows pure-Python code, so read the shares, not the totals). No device sync inside the profiled steps."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, function): (primitive calls, calls, tottime, cumtime, callers)}
    per: dict[str, list[float]] = {}
    for (file, line, fn), (_, calls, tottime, _, _) in stats.items():
        name = f"{fn} ({Path(file).name}:{line})" if file != "~" else fn  # "~": built-ins such as torch's C functions
        acc = per.setdefault(name, [0.0, 0])
        acc[0] += tottime
        acc[1] += calls
    total = sum(t for t, _ in per.values())
    ranked = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    return [["TOTAL", round(total * 1e3 / steps, 3)]] + [
        [name[:120], round(t * 1e3 / steps, 3), round(c / steps, 1)] for name, (t, c) in ranked]


def sync_points(step, set_mode=None) -> dict[str, int]:
    """The places in one call of ``step`` where the host waited for the device: ``{"file:line": count}`` from
    PyTorch's sync debug mode (its warnings name the Python line that made the synchronising call). A sync in
    a step makes its host time include the GPU's (host_ms == ms without being host-bound) and idles the GPU
    while the host issues the rest."""
    set_mode = set_mode or torch.cuda.set_sync_debug_mode
    found: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_mode("warn")
        try:
            step()
        finally:
            set_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{Path(w.filename).name}:{w.lineno}"
            found[where] = found.get(where, 0) + 1
    return found


def layer_setup(tiny: bool, mode: str = "auto") -> ModelConfig:
    """The model config whose width, mixer options and attention options the layers read."""
    cfg = ModelConfig.from_preset("A0.3B-2B")
    if tiny:
        cfg = ModelConfig(hidden_size=64, num_layers=cfg.num_layers, attention=AttentionConfig(num_heads=2, qkv_bias=True))
    return dataclasses.replace(cfg, mixer_options=dataclasses.replace(cfg.mixer_options, mode=mode))


def run_one(mixer: str, T: int, args, cfg: ModelConfig, device: torch.device, seconds_left: float) -> dict:
    B = max(1, args.tokens // T)
    row = {"mixer": mixer, "T": T, "B": B}
    layer = x = dy = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        # Layer 0 of the preset's 12: mixers with a depth-dependent setting (lightning's decay) take the first.
        layer = build_mixer(mixer, cfg.hidden_size, cfg.mixer_options, cfg.attention, 0, cfg.num_layers).to(device)
        x = torch.randn(B, T, cfg.hidden_size, device=device, requires_grad=True)
        dy = torch.randn(B, T, cfg.hidden_size, device=device, dtype=torch.bfloat16)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y, _ = layer(x)
            y.backward(dy.to(y.dtype))
            layer.zero_grad(set_to_none=True)
            x.grad = None

        seen: dict = {}
        with record_backends(seen), Timer(device) as first:
            step()  # also compiles / autotunes the Triton kernels
        row["backend"] = describe_backends(mixer, seen)
        for _ in range(args.warmup - 1):
            step()
        with Timer(device) as probe:
            step()
        # as many timed steps as fit in this configuration's share of the budget (at least one)
        steps = max(1, min(args.steps, int(seconds_left * 1e3 / max(probe.ms, 1e-3))))
        with Timer(device) as timed:
            for _ in range(steps):
                step()
        ms = timed.ms / steps
        row.update(ms=ms, host_ms=timed.host_ms / steps, tok_s=B * T / (ms / 1e3), steps=steps, first_step_ms=first.ms,
                   params=sum(p.numel() for p in layer.parameters()))
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        if device.type == "cuda":
            row["host_syncs"] = sync_points(step)
        if device.type == "cuda" and T in args.profile_lengths:
            from model_bench import top_kernels

            row["top_kernels"] = top_kernels(step, args.profile_top)
        if T in args.host_profile_lengths:
            row["host_profile"] = host_profile(step, top=args.profile_top)
            if device.type == "cuda":
                torch.cuda.synchronize()
    except Exception as e:  # record and go on: one mixer's OOM or missing kernel must not lose the table
        msg = repr(e)  # a Triton CompilationError puts its reason last, after the kernel's source
        row["error"] = msg if len(msg) <= 600 else f"{msg[:200]} ... {msg[-400:]}"
        if args.verbose:
            traceback.print_exc()
    finally:
        layer = x = dy = None  # free the memory before the next configuration
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def resumed_rows(path: str, env: dict, shapes: dict) -> dict:
    """The measured rows of an earlier run, by (mixer, T), each marked with that run's commit and source digest.
    Refuses a file from another device, torch / Triton / fla version or shape: its numbers do not compare."""
    earlier = json.loads(Path(path).read_text())
    for key in ("device", "torch", "triton", "fla"):
        if earlier["environment"].get(key) != env.get(key):
            raise SystemExit(f"--resume {path}: measured with {key}={earlier['environment'].get(key)!r}, this run has "
                             f"{env.get(key)!r}; rows from different setups do not compare")
    if earlier["shapes"] != shapes:
        raise SystemExit(f"--resume {path}: shapes {earlier['shapes']} differ from this run's {shapes}")
    origin = {k: earlier["environment"].get(k) for k in ("commit", "source_digest") if earlier["environment"].get(k)}
    return {(r["mixer"], r["T"]): {**r, "resumed_from": r.get("resumed_from", origin)}
            for r in earlier["rows"] if "error" not in r}


def add_ratios(rows: list[dict]) -> None:
    """``vs_attention``: this mixer's tokens/s over ``attention``'s at the same T (> 1: faster)."""
    reference = {r["T"]: r["tok_s"] for r in rows if r["mixer"] == REFERENCE and "tok_s" in r}
    for r in rows:
        if "tok_s" in r and r["T"] in reference:
            r["vs_attention"] = r["tok_s"] / reference[r["T"]]


def table(rows: list[dict]) -> str:
    lines = [f"{'mixer':20s} {'T':>6s} {'B':>3s} {'ms fwd+bwd':>11s} {'host ms':>8s} {'tokens/s':>10s} {'x attn':>7s} "
             f"{'peak GiB':>9s}  backend / error"]
    for r in rows:
        if "ms" in r:
            ratio = f"{r['vs_attention']:7.2f}" if "vs_attention" in r else "      -"
            peak = f"{r['peak_gib']:9.2f}" if r.get("peak_gib") is not None else "        -"
            host = f"{r['host_ms']:8.2f}" if r.get("host_ms") is not None else "       -"  # resumed older rows lack it
            lines.append(f"{r['mixer']:20s} {r['T']:6d} {r['B']:3d} {r['ms']:11.2f} {host} {r['tok_s']:10.0f} {ratio} "
                         f"{peak}  {r.get('backend', '')}")
        else:
            lines.append(f"{r['mixer']:20s} {r['T']:6d} {r['B']:3d} {'-':>11s} {'-':>8s} {'-':>10s} {'-':>7s} {'-':>9s}  "
                         f"ERROR {r['error'][:90]}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixers", default="all", help="comma list of registry names, or 'all'")
    p.add_argument("--lengths", default="", help="comma list of sequence lengths (default 2048,8192,32768; --tiny 32,64)")
    p.add_argument("--tokens", type=int, default=0, help="tokens per step (default 32768; --tiny 128); B = tokens / T")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (fewer if the budget is short)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for the whole table (a device "
                   "command may run 10 minutes); configurations past it are recorded as skipped")
    p.add_argument("--mode", default="auto", choices=["auto", "chunk", "fused_recurrent"],
                   help="MixerConfig.mode of every linear mixer")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="hidden 64, 2 heads, short lengths: a CPU dry run")
    p.add_argument("--profile-lengths", default="", help="comma list of lengths to record the top GPU kernels at")
    p.add_argument("--host-profile-lengths", default="",
                   help="comma list of lengths to record where the host's time to issue a step goes (cProfile)")
    p.add_argument("--profile-top", type=int, default=12)
    p.add_argument("--out", default="", help="output folder (default $OUT, else benchmarks/results/)")
    p.add_argument("--resume", default="", help="a mixer_bench.json of an earlier call on the same kind of machine: "
                   "its measured rows are kept and not run again (a table that outlasts one device call)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    args.lengths = [int(t) for t in (args.lengths or ("32,64" if args.tiny else "2048,8192,32768")).split(",") if t]
    args.tokens = args.tokens or (128 if args.tiny else 32768)
    for name in ("profile_lengths", "host_profile_lengths"):
        setattr(args, name, {int(t) for t in getattr(args, name).split(",") if t})
    known = available_mixers()
    mixers = known if args.mixers == "all" else [m for m in args.mixers.split(",") if m]
    unknown = [m for m in mixers if m not in known]
    if unknown:
        p.error(f"--mixers: unknown {unknown}; choose from {', '.join(known)}")
    args.mixers = sorted(mixers, key=lambda m: m != REFERENCE)
    if args.warmup < 1 or args.steps < 1:
        p.error(f"--warmup={args.warmup} and --steps={args.steps} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --device cpu --tiny for a dry run")
    cfg = layer_setup(args.tiny, args.mode)
    env = environment(device)
    print(json.dumps(env), flush=True)
    out = Path(args.out or os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    shapes = {"hidden": cfg.hidden_size, "heads": cfg.attention.num_heads, "tokens_per_step": args.tokens,
              "dtype": "bf16 autocast (fp32 weights)", "mode": cfg.mixer_options.mode}
    t0, rows = time.perf_counter(), []
    kept = resumed_rows(args.resume, env, shapes) if args.resume else {}

    def save() -> None:
        add_ratios(rows)
        (out / "mixer_bench.json").write_text(json.dumps(
            {"environment": env, "args": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()},
             "shapes": shapes, "rows": rows}, indent=1))

    configs = [(m, T) for m in args.mixers for T in args.lengths]
    todo = sum((m, T) not in kept for m, T in configs)
    for mixer, T in configs:
        if (mixer, T) in kept:
            rows.append(kept[(mixer, T)])
            continue
        left = args.budget_s - (time.perf_counter() - t0)
        todo -= 1
        if left <= 0:
            rows.append({"mixer": mixer, "T": T, "B": max(1, args.tokens // T), "error": "skipped: --budget-s spent"})
        else:
            rows.append(run_one(mixer, T, args, cfg, device, left / (todo + 1)))
        save()
    print()
    print(table(rows))
    print(f"\nwrote {out / 'mixer_bench.json'}")
    return rows


if __name__ == "__main__":
    main()
