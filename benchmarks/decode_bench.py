"""Decode speed of the A0.3B-2B preset (Qwen2-MoE flavour) at long context: pure Gated DeltaNet (a recurrent
state per layer) against all-softmax attention (a KV cache per layer), bf16 weights, in one run.

    python benchmarks/decode_bench.py [--contexts 1024,8192,32768] [--kinds gdn,attention] [--batch 1]
                                      [--new-tokens 128] [--warmup 8] [--prefill-chunk 0] [--cuda-graph] [--no-graph]
    python benchmarks/decode_bench.py --device cpu --tiny      # a dry run of the same code on a tiny model

For each context length: prefill a random prompt (the linear model optionally chunk by chunk, carrying its
states), give every attention KV cache room for the whole decode (as ``model.generate`` does: the cache is
preallocated and written in place, so a one-token step has fixed shapes), then time ``--new-tokens``
one-token steps with CUDA events, one event per step and no host synchronisation inside the loop (greedy
sampling stays on the device). Reports per-token latency (median, p90), decode tokens/s, prefill time, and
issue 8's targets: the linear model's latency flat from the shortest to the longest context (within ±15%)
and ≥ 3× faster than softmax attention at the longest context.

Modes, for both kinds alike: ``eager`` (each step launched from Python) and ``graph`` (the whole one-token
step, forward + argmax + state update, captured once in a CUDA graph and replayed). ``--cuda-graph`` times
the graph mode, ``--no-graph`` the eager mode, both flags both (each from the same prefill); neither means
eager. Targets are judged within one mode (eager against eager, graph against graph). On the CPU the graph
mode runs the same fixed-buffer step without a graph (marked ``static`` in the table).

Writes ``$OUT/decode_bench.json`` (or ``benchmarks/results/``), rewritten after every row.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

# a 51 GB KV cache (softmax attention, batch 32, 32K context) built row by row fragments the default
# allocator's segments past fitting on an 80 GB card; expandable segments keep it one mapping
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from linear_moe.layers.attention import SoftmaxAttention, is_kv_cache  # noqa: E402
from linear_moe.layers.config import AttentionConfig  # noqa: E402
from linear_moe.model.causal_lm import LinearMoEForCausalLM  # noqa: E402
from linear_moe.model.config import ModelConfig  # noqa: E402
from linear_moe.model.generation import reserve_caches, stack_states  # noqa: E402
from linear_moe.moe.config import MoEConfig  # noqa: E402
from mixer_bench import Timer, environment  # noqa: E402

KINDS = {"gdn": ("gated_deltanet", "L"), "attention": ("attention", "N")}  # name -> (mixer, layer letter)
FLAT_TOLERANCE = 0.15   # issue 8: per-token latency flat within ±15% from the shortest to the longest context
SPEEDUP_TARGET = 3.0    # issue 8: ≥ 3× the softmax model's decode speed at the longest context


def model_config(kind: str, tiny: bool) -> ModelConfig:
    mixer, letter = KINDS[kind]
    if tiny:
        return ModelConfig(base_model="qwen2", vocab_size=256, hidden_size=64, num_layers=2, mixer=mixer,
                           layer_pattern=letter * 2, intermediate_size=96, attention=AttentionConfig(num_heads=2),
                           moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=32))
    return ModelConfig.from_preset("A0.3B-2B", base_model="qwen2", mixer=mixer, layer_pattern=letter * 12)


def build_model(kind: str, args, device: torch.device) -> LinearMoEForCausalLM:
    with torch.device(device):  # initialise on the device: 2B parameters are slow to fill on the host
        model = LinearMoEForCausalLM(model_config(kind, args.tiny))
    for module in model.modules():
        if isinstance(module, SoftmaxAttention):
            module.decode_kernel = args.attention_decode
    return model.to(dtype=args.dtype).eval()


def _private(state):
    """A copy of a decoding state that shares the attention caches' key/value buffers (at batch 32 and 32K
    context they are 51 GB: no copy fits beside them) and copies everything else. Sharing is safe here: a
    step writes only the slots past the cache's ``used`` count, which every later step rewrites before it
    reads them, so neither copy sees the other's writes."""
    if is_kv_cache(state):
        return {key: value if key in ("k", "v") else _private(value) for key, value in state.items()}
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {key: _private(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [_private(value) for value in state]
    return state


def _copy_into(old, new) -> None:
    """Make the state ``old`` equal ``new`` in place: tensors copied into ``old``'s buffers (skipped where the
    layer already wrote in place), ints (attention's host slot count) assigned."""
    if isinstance(old, dict):
        for k, v in new.items():
            if isinstance(v, torch.Tensor):
                if v is not old[k]:
                    old[k].copy_(v)
            elif isinstance(v, (dict, list, tuple)):
                _copy_into(old[k], v)
            else:
                old[k] = v
    elif isinstance(old, (list, tuple)):
        for i, v in enumerate(new):
            if isinstance(v, torch.Tensor):
                if v is not old[i]:
                    old[i].copy_(v)
            elif v is not None:
                _copy_into(old[i], v)


def prefill(model, prompt: torch.Tensor, chunk: int, reserve: int = 0):
    """Run the prompt ``[batch, context]`` row by row (bounded activation memory at long context), each
    row in chunks of ``chunk`` tokens when > 0 (states carried). Returns (last logits ``[batch, vocab]``,
    states, attention caches with room for ``reserve`` more tokens)."""
    logits, states = [], []
    for row in prompt.split(1):
        step = chunk if chunk > 0 else row.shape[1]
        state = None
        for start in range(0, row.shape[1], step):
            out = model(row[:, start:start + step], states=state, return_states=True, logits_to_keep=1)
            state = out.states
        logits.append(out.logits[:, -1])
        states.append(state)
        out = state = None
    return torch.cat(logits), stack_states(states, reserve, consume=True)  # consume: the cache is not held twice


def decode_eager(model, token: torch.Tensor, states, steps: int, events: list | None = None):
    """``steps`` greedy one-token steps from ``token`` ``[batch]``; returns (tokens ``[batch, steps]``, states).
    With ``events`` (steps + 1 CUDA events) records one before the loop and one after each step."""
    out_tokens = []
    if events:
        events[0].record()
    for i in range(steps):
        out = model(token[:, None], states=states, return_states=True)
        states = out.states
        token = out.logits[:, -1].argmax(-1)  # on the device: no host sync per token
        out_tokens.append(token)
        if events:
            events[i + 1].record()
    return torch.stack(out_tokens, 1), states


class StaticDecode:
    """The one-token step writing into fixed buffers: forward, argmax into ``self.token``, the new states
    copied into ``self.states`` (attention caches are written in place by the layer). Fixed addresses make it
    capturable: with ``cuda_graph`` the whole step is one CUDA graph replay. ``step()`` returns the new token
    ``[batch]`` (a view of the static buffer). Attention caches get room for ``max_steps`` more tokens up
    front: a replay never runs the layer's Python, so the cache cannot grow inside the graph."""

    def __init__(self, model, token: torch.Tensor, states, cuda_graph: bool = False, warmup: int = 3,
                 max_steps: int = 1024):
        self.model, self.graph = model, None
        self.token = token[:, None].clone()
        self.states = _private(reserve_caches(states, max_steps + warmup + 1))
        if cuda_graph:
            start_token, start_states = self.token.clone(), _private(self.states)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # kernels autotune and allocate outside the capture
                for _ in range(warmup):
                    self._body()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._body()
            # the warm-up advanced the buffers: start again from the given token and states
            self.token.copy_(start_token)
            _copy_into(self.states, start_states)

    def _body(self) -> None:
        out = self.model(self.token, states=self.states, return_states=True)
        _copy_into(self.states, out.states)
        self.token.copy_(out.logits[:, -1:].argmax(-1))

    def step(self) -> torch.Tensor:
        if self.graph is None:
            self._body()
        else:
            self.graph.replay()
        return self.token[:, 0]


def run_one(model, kind: str, context: int, args, device: torch.device) -> list[dict]:
    """One prefill of a random ``[batch, context]`` prompt, then one timed decode per mode: a row each."""
    base = {"kind": kind, "context": context, "batch": args.batch}
    rows, prompt, states = [], None, None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        prompt = torch.randint(0, model.config.vocab_size, (args.batch, context), device=device)
        chunk = args.prefill_chunk if kind != "attention" else 0  # attention's chunked prefill needs a dense mask
        # room for every step this row takes (warm-up, the graph check and capture, the timed steps), made
        # when the rows are stacked: growing the cache later would copy it (twice its size in memory)
        room = args.warmup + args.new_tokens + 16
        with Timer(device) as t:
            logits, states = prefill(model, prompt, chunk, room)
        base["prefill_ms"] = t.ms
        token = logits.argmax(-1)
        if args.warmup:  # warm the kernels and the allocator
            tokens, states = decode_eager(model, token, states, args.warmup)
            token = tokens[:, -1]
    except Exception as e:  # record and go on: an OOM at 32K must not lose the rest of the table
        rows = [{**base, "mode": mode, "error": repr(e)[:400]} for mode in args.modes]
        if args.verbose:
            traceback.print_exc()
    else:
        rows = [decode_row(model, dict(base, mode=mode), token, states, args, device) for mode in args.modes]
    finally:
        prompt = states = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def decode_row(model, row: dict, token: torch.Tensor, states, args, device: torch.device) -> dict:
    """Time ``args.new_tokens`` steps in ``row["mode"]`` from ``token`` and ``states`` (which it does not
    advance: an attention cache's later slots are rewritten before they are read)."""
    graph = None
    try:
        if row["mode"] == "graph":
            want, _ = decode_eager(model, token, states, 4)
            capture = device.type == "cuda"
            graph = StaticDecode(model, token, states, cuda_graph=capture, max_steps=4 + args.new_tokens)
            got = torch.stack([graph.step().clone() for _ in range(4)], 1)
            row["cuda_graph"] = capture
            row["graph_matches_eager"] = bool(torch.equal(got, want))  # same kernels: same tokens
            token = got[:, -1]
        latencies = time_decode(model, token, states, graph, args.new_tokens, device)
        latencies.sort()
        median = statistics.median(latencies)
        row.update(latency_ms=median, latency_p90_ms=latencies[int(0.9 * (len(latencies) - 1))],
                   latency_mean_ms=statistics.fmean(latencies), tok_s=row["batch"] * 1e3 / statistics.fmean(latencies),
                   steps=len(latencies))
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    except Exception as e:  # a failed capture (or OOM) is reported in its row; the other mode still runs
        row["error"] = repr(e)[:400]
        if args.verbose:
            traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        graph = None
    return row


def time_decode(model, token, states, graph: StaticDecode | None, steps: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``steps`` one-token steps."""
    if device.type != "cuda":  # the CPU dry run: wall clock per step
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            if graph is None:
                token, states = decode_eager(model, token, states, 1)
                token = token[:, 0]
            else:
                graph.step()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    if graph is None:
        decode_eager(model, token, states, steps, events)
    else:
        events[0].record()
        for i in range(steps):
            graph.step()
            events[i + 1].record()
    torch.cuda.synchronize()
    return [events[i].elapsed_time(events[i + 1]) for i in range(steps)]


def summarize(rows: list[dict], contexts: list[int]) -> dict:
    """Per mode: flatness of each kind (latency at the longest / the shortest context) and the speed-up of
    each linear kind over attention at the longest context in the same mode, against issue 8's targets.
    ``kinds`` repeats the graph mode's entries when there are any (the fair comparison), else eager's."""
    lo, hi = min(contexts), max(contexts)
    out = {"flat_tolerance": FLAT_TOLERANCE, "speedup_target": SPEEDUP_TARGET, "modes": {}}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        lat = {(r["kind"], r["context"]): r["latency_ms"] for r in rows if r["mode"] == mode and "latency_ms" in r}
        entries = {}
        for kind in dict.fromkeys(r["kind"] for r in rows):
            entry = {}
            if (kind, lo) in lat and (kind, hi) in lat:
                entry["flatness"] = lat[(kind, hi)] / lat[(kind, lo)]
                entry["flat_met"] = abs(entry["flatness"] - 1) <= FLAT_TOLERANCE
            if kind != "attention" and (kind, hi) in lat and ("attention", hi) in lat:
                entry["speedup_vs_attention"] = lat[("attention", hi)] / lat[(kind, hi)]
                entry["speedup_met"] = entry["speedup_vs_attention"] >= SPEEDUP_TARGET
            entries[kind] = entry
        out["modes"][mode] = entries
    out["kinds"] = out["modes"].get("graph", out["modes"].get("eager", {}))
    return out


def _mode_label(row: dict) -> str:
    if row["mode"] == "eager":
        return "eager"
    return "cuda graph" if row.get("cuda_graph") else "static"


def table(rows: list[dict], summary: dict) -> str:
    lines = [f"{'kind':10s} {'context':>8s} {'B':>3s} {'mode':>10s} {'ms/token':>9s} {'p90':>7s} {'tokens/s':>9s} "
             f"{'prefill ms':>11s} {'peak GiB':>9s}"]
    for r in rows:
        head = f"{r['kind']:10s} {r['context']:8d} {r['batch']:3d} {_mode_label(r):>10s}"
        if "latency_ms" in r:
            peak = f"{r['peak_gib']:9.2f}" if r.get("peak_gib") is not None else "        -"
            lines.append(f"{head} {r['latency_ms']:9.3f} {r['latency_p90_ms']:7.3f} {r['tok_s']:9.1f} "
                         f"{r['prefill_ms']:11.1f} {peak}")
        else:
            lines.append(f"{head}  ERROR {r['error'][:90]}")
    for mode, kinds in summary["modes"].items():
        for kind, e in kinds.items():
            if "flatness" in e:
                lines.append(f"[{mode}] {kind}: latency at longest / shortest context = {e['flatness']:.3f} "
                             f"(target 1 ± {FLAT_TOLERANCE}: {'met' if e['flat_met'] else 'NOT met'})")
            if "speedup_vs_attention" in e:
                lines.append(f"[{mode}] {kind}: {e['speedup_vs_attention']:.2f}x attention's decode speed at the "
                             f"longest context (target >= {SPEEDUP_TARGET}x: {'met' if e['speedup_met'] else 'NOT met'})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="", help="comma list of context lengths (default 1024,8192,32768; --tiny 16,64)")
    p.add_argument("--kinds", default="gdn,attention", help=f"comma list of {', '.join(KINDS)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=0, help="timed decode steps (default 128; --tiny 4)")
    p.add_argument("--warmup", type=int, default=8, help="untimed decode steps first")
    p.add_argument("--prefill-chunk", type=int, default=0, help="prefill the linear model in chunks of this many tokens (0: at once)")
    p.add_argument("--cuda-graph", action="store_true", help="time the one-token step captured in a CUDA graph (both kinds)")
    p.add_argument("--no-graph", action="store_true", help="time the eager one-token step (also with --cuda-graph)")
    p.add_argument("--attention-decode", default="auto", choices=["auto", "sdpa", "matmul"],
                   help="how attention reads its cache in a step (layers/attention.py cached_attention)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of width 64 and short contexts: a CPU dry run")
    p.add_argument("--out", default="", help="output folder (default $OUT, else benchmarks/results/)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    args.contexts = [int(c) for c in (args.contexts or ("16,64" if args.tiny else "1024,8192,32768")).split(",") if c]
    args.new_tokens = args.new_tokens or (4 if args.tiny else 128)
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.modes = (["eager"] if args.no_graph or not args.cuda_graph else []) + (["graph"] if args.cuda_graph else [])
    bad = [k for k in args.kinds if k not in KINDS]
    if bad:
        p.error(f"--kinds: unknown {bad}; choose from {', '.join(KINDS)}")
    for name in ("batch", "new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.warmup < 0 or args.prefill_chunk < 0 or min(args.contexts, default=0) < 1:
        p.error("--warmup and --prefill-chunk must be >= 0 and every context >= 1")
    args.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    return args


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --device cpu --tiny for a dry run")
    env = environment(device)
    print(json.dumps(env), flush=True)
    out = Path(args.out or os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def save() -> dict:
        summary = summarize(rows, args.contexts)
        saved_args = {k: str(v) if isinstance(v, torch.dtype) else v for k, v in vars(args).items()}
        (out / "decode_bench.json").write_text(json.dumps(
            {"environment": env, "args": saved_args, "rows": rows, "summary": summary}, indent=1))
        return summary

    for kind in args.kinds:
        model = None
        try:
            model = build_model(kind, args, device)
            for context in args.contexts:
                rows += run_one(model, kind, context, args, device)
                save()
        except Exception as e:  # the model itself did not build (OOM): record it for every context
            rows += [{"kind": kind, "context": c, "batch": args.batch, "mode": m, "error": repr(e)[:400]}
                     for c in args.contexts for m in args.modes
                     if not any(r["kind"] == kind and r["context"] == c and r["mode"] == m for r in rows)]
        finally:
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    summary = save()
    print()
    print(table(rows, summary))
    print(f"\nwrote {out / 'decode_bench.json'}")
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
