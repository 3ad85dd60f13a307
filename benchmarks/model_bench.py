"""Training throughput of the A0.3B-2B preset (Qwen2-MoE flavour) per token mixer and sequence length,
beside the peer a user would assemble today (HF transformers Qwen2-MoE ± fla layers), in one run.

    python benchmarks/model_bench.py [--lengths 2048,8192,32768,65536] [--tokens-per-step 32768]
                                     [--kinds gdn,gla,hybrid,attention] [--peer] [--steps 4]

Prints a table and writes ``$OUT/model_bench.json`` (or ``benchmarks/results/``) with the device, torch /
Triton / fla versions, commit, shapes and numbers, and a PNG of tokens/s against sequence length.
Both sides train in bf16 with fused AdamW; ours keeps fp32 master weights under autocast (the trainer's
default) unless ``--pure-bf16`` (the peer's setting: weights and optimizer state in bf16).
A kind with the suffix ``@graph`` (e.g. ``gdn@graph``) captures our whole training step (forward, backward,
AdamW) in one CUDA graph after the warm-up steps and replays it: the step has static shapes and no
host-device syncs, so the graph removes the host's kernel-launch time (thousands of launches per step).
Every row's loss runs the library's default on CUDA, its Triton softmax kernel; a further ``+torch_ce`` (e.g.
``gdn@graph+torch_ce``) runs that row's loss in PyTorch (``LINEAR_MOE_CE_KERNEL=0``), so one run compares the
loss forms.
The peer cannot be captured (HF's per-expert loop syncs with the host to find each expert's tokens).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance.py beside this file
from provenance import git_commit, source_digest  # noqa: E402

from linear_moe.model.causal_lm import LinearMoEForCausalLM  # noqa: E402
from linear_moe.model.config import ModelConfig  # noqa: E402
from linear_moe.parallel.activation_checkpoint import apply_activation_checkpointing  # noqa: E402
from linear_moe.train.cuda_graph import capture_step  # noqa: E402
from linear_moe.train.flops import peak_flops, training_flops_per_token  # noqa: E402

KINDS = {  # name -> (mixer, layer pattern)
    "gdn": ("gated_deltanet", "L" * 12),
    "gla": ("gla", "L" * 12),
    "hybrid": ("gated_deltanet", "LLLN" * 3),
    "attention": ("attention", "N" * 12),
}


def our_config(kind: str, shared_expert: bool, expert_backend: str = "auto", expert_recompute: bool | None = None) -> ModelConfig:
    mixer, pattern = KINDS[kind]
    cfg = ModelConfig.from_preset("A0.3B-2B", base_model="qwen2", mixer=mixer, layer_pattern=pattern)
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, expert_backend=expert_backend))
    if expert_recompute is not None:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, expert_recompute=expert_recompute))
    if shared_expert:  # the peer's Qwen2-MoE block has one gated shared expert of width 896
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_shared_experts=1, shared_expert_hidden_size=896,
                                                               shared_expert_gate=True))
    return cfg


def build_peer(kind: str):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=151936, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=8, num_experts=64, num_experts_per_tok=8,
                         moe_intermediate_size=896, shared_expert_intermediate_size=896, max_position_embeddings=131072,
                         decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False, output_router_logits=False,
                         attn_implementation="sdpa", tie_word_embeddings=False)
    model = Qwen2MoeForCausalLM(cfg)
    if kind != "peer_sdpa":
        from fla.layers import GatedDeltaNet, GatedLinearAttention

        class Wrap(torch.nn.Module):
            def __init__(self, layer):
                super().__init__()
                self.layer = layer

            def forward(self, hidden_states, *a, **k):
                return self.layer(hidden_states)[0], None

        for i, layer in enumerate(model.model.layers):
            inner = (GatedLinearAttention(mode="chunk", hidden_size=1024, num_heads=8, expand_k=0.5, expand_v=1.0, layer_idx=i)
                     if kind == "peer_fla_gla" else GatedDeltaNet(hidden_size=1024, num_heads=8, head_dim=128, expand_v=1, layer_idx=i))
            layer.self_attn = Wrap(inner)
    return model


def time_steps(model, step_fn, n_warm: int, n_steps: int) -> tuple[float, float, float]:
    """(seconds per step, the last loss, the host's seconds per step to issue the work before waiting for it: close
    to the first when the host, not the GPU, sets the pace)."""
    for _ in range(n_warm):
        step_fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        loss = step_fn()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n_steps, float(loss), (issued - t0) / n_steps


def top_kernels(step_fn, n: int) -> list[list]:
    """The ``n`` GPU kernels with the most total time over one profiled step: [name, ms, calls]."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step_fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            ms, calls = per.get(e.name, (0.0, 0))
            per[e.name] = (ms + e.device_time / 1e3, calls + 1)
    total = sum(ms for ms, _ in per.values())
    top = sorted(per.items(), key=lambda kv: -kv[1][0])[:n]
    return [["TOTAL", round(total, 2), sum(c for _, c in per.values())]] + [[k[:90], round(ms, 2), c] for k, (ms, c) in top]


def parse_kind(kind: str) -> tuple[str, bool, bool]:
    """'gdn@graph+torch_ce' -> ('gdn', True, False): the kind, whether the step is graphed, whether the loss
    runs its Triton softmax kernel (LINEAR_MOE_CE_KERNEL for that row: on unless +torch_ce); raises for an
    unknown kind or suffix."""
    rest, _, flag = kind.partition("+")
    base, _, variant = rest.partition("@")
    peers = ("peer_sdpa", "peer_fla_gla", "peer_fla_gdn")
    if (base not in (*KINDS, *peers) or variant not in ("", "graph") or flag not in ("", "torch_ce")
            or ((variant or flag) and base in peers)):
        raise ValueError(f"kind {kind!r}: allowed {', '.join(KINDS)} (each optionally @graph, then optionally "
                         f"+torch_ce) and {', '.join(peers)}")
    return base, variant == "graph", base not in peers and flag != "torch_ce"  # a peer computes its own loss


def run_one(kind: str, T: int, tokens_per_step: int, args) -> dict:
    B = max(1, tokens_per_step // T)
    row = {"kind": kind, "T": T, "B": B}
    base, use_graph, ce_kernel = parse_kind(kind)
    os.environ["LINEAR_MOE_CE_KERNEL"] = "1" if ce_kernel else "0"  # read at each loss call: this row only
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = opt = x = step = None
    try:
        if base.startswith("peer"):
            with torch.device("cuda"):  # initialised on the GPU: a 2.5B-parameter CPU init took ~90 s per row
                model = build_peer(base).to(torch.bfloat16)
            ours = False
        else:
            with torch.device("cuda"):  # as the trainer builds it (CPU init: ~90 s of a device call per row)
                model = LinearMoEForCausalLM(our_config(base, args.shared_expert, args.expert_backend,
                                                             None if args.expert_recompute is None
                                                             else args.expert_recompute == "on"))
            apply_activation_checkpointing(model, args.checkpointing if T >= args.checkpoint_from else "none")
            if args.pure_bf16:
                model = model.to(torch.bfloat16)
            ours = True
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=use_graph)
        x = torch.randint(0, 151936, (B, T), device="cuda")

        def body():
            # under capture autocast must not cache casts across the graph boundary
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not use_graph):
                if ours:
                    out = model(x, labels=torch.roll(x, -1, 1), return_logits=False)
                else:
                    out = model(input_ids=x, labels=x)
            out.loss.backward()
            opt.step()
            return out.loss.detach()

        def step():
            loss = body()
            opt.zero_grad(set_to_none=True)
            return loss

        if use_graph:
            t0 = time.perf_counter()
            step = capture_step(body, opt, args.warmup)
            row["capture_s"] = round(time.perf_counter() - t0, 1)
        dt, loss, host_dt = time_steps(model, step, 1 if use_graph else args.warmup, args.steps)
        if T in args.profile_lengths:
            row["top_kernels"] = top_kernels(step, args.profile_top)
        row.update(tok_s=B * T / dt, step_s=dt, host_step_s=host_dt, loss=loss, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                   params=sum(p.numel() for p in model.parameters()))
        if ours:
            fpt = training_flops_per_token(model, T)
            peak = peak_flops(torch.device("cuda"))
            row.update(flops_per_token=fpt, mfu=(B * T / dt) * fpt / peak if peak else None)
    except Exception as e:  # record and go on: an OOM at one length must not lose the rest of the table
        row["error"] = repr(e)[:400]
        if args.verbose:
            traceback.print_exc()
    finally:
        # free the GPU memory (and the graph's pool) before the next configuration: the checkpointing wrappers
        # make reference cycles, which only the cycle collector frees (without it a 64K-token step's pool stayed)
        model = opt = x = step = body = None
        gc.collect()
        torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def environment() -> dict:
    import triton

    env = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__}
    try:
        import fla

        env["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        env["fla"] = None
    env["commit"], env["source_digest"] = git_commit(), source_digest()
    return env


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(r["kind"] for r in rows):
        pts = [(r["T"], r["tok_s"]) for r in rows if r["kind"] == kind and "tok_s" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per sequence")
    ax.set_ylabel("training tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _best(rows: list[dict], base: str, T: int) -> dict | None:
    """The fastest measured row of kind ``base`` (any @graph / +torch_ce variant) at length T, or None."""
    found = [r for r in rows if "tok_s" in r and r["T"] == T and parse_kind(r["kind"])[0] == base]
    return max(found, key=lambda r: r["tok_s"], default=None)


def issue_targets(rows: list[dict]) -> dict:
    """Issue 9's targets from the rows of one run, each with what was measured (the fastest variant of a kind),
    the target and whether it is met; a target whose rows were not in the run is left out.

    Beside "gdn at 32K >= 3x attention", ``flop_ratio`` is attention's training FLOPs per token over gdn's at 32K:
    the speed ratio the two models would have at equal MFU. A measured ratio above it needs gdn's step to run at a
    higher MFU than attention's.
    """
    out: dict = {}
    gdn2k = _best(rows, "gdn", 2048)
    if gdn2k and gdn2k.get("mfu") is not None:
        out["gdn MFU >= 30% at 2K"] = {"measured": round(gdn2k["mfu"], 4), "kind": gdn2k["kind"],
                                       "met": gdn2k["mfu"] >= 0.30}
    for base in ("gdn", "gla"):
        short, long = _best(rows, base, 2048), _best(rows, base, 32768)
        if short and long:
            ratio = long["tok_s"] / short["tok_s"]
            out[f"{base} tok/s at 32K >= 0.9x at 2K"] = {"measured": round(ratio, 3), "met": ratio >= 0.9}
    gdn, attention = _best(rows, "gdn", 32768), _best(rows, "attention", 32768)
    if gdn and attention:
        ratio = gdn["tok_s"] / attention["tok_s"]
        entry = {"measured": round(ratio, 3), "kinds": [gdn["kind"], attention["kind"]], "met": ratio >= 3.0}
        if gdn.get("flops_per_token") and attention.get("flops_per_token"):
            entry["flop_ratio"] = round(attention["flops_per_token"] / gdn["flops_per_token"], 3)
            entry["mfu"] = [gdn.get("mfu"), attention.get("mfu")]
        out["gdn at 32K >= 3x attention at 32K"] = entry
    gdn8k = _best(rows, "gdn", 8192)
    for peer in ("peer_fla_gdn", "peer_sdpa", "peer_fla_gla"):
        other = _best(rows, peer, 8192)
        if gdn8k and other:
            ratio = gdn8k["tok_s"] / other["tok_s"]
            out[f"gdn >= 1.5x {peer} at 8K"] = {"measured": round(ratio, 3), "kind": gdn8k["kind"], "met": ratio >= 1.5}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="2048,8192,32768,65536")
    p.add_argument("--tokens-per-step", type=int, default=32768)
    p.add_argument("--kinds", default="gdn,gla,hybrid,attention",
                   help=f"comma list of {', '.join(KINDS)}, each optionally with @graph (CUDA-graph the step)")
    p.add_argument("--peer", default="", help="comma list of peer_sdpa, peer_fla_gla, peer_fla_gdn")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--checkpointing", default="selective")
    p.add_argument("--checkpoint-from", type=int, default=32768, help="use activation checkpointing from this length")
    p.add_argument("--shared-expert", action="store_true", help="add the peer's gated shared expert (same architecture)")
    p.add_argument("--pure-bf16", action="store_true")
    p.add_argument("--expert-backend", default="auto", choices=["auto", "grouped_mm", "fused_gather"],
                   help="our rows' MoE expert backend (fused_gather: Triton GEMMs reading the routed rows by index)")
    p.add_argument("--expert-recompute", default=None, choices=["on", "off"],
                   help="moe.expert_recompute of our rows (default: the preset's; on: backward re-gathers the routed rows "
                        "and recomputes the SwiGLU output)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--profile-lengths", default="", help="comma list of lengths to profile one step at (top kernels)")
    p.add_argument("--profile-top", type=int, default=15)
    args = p.parse_args()
    args.profile_lengths = {int(t) for t in args.profile_lengths.split(",") if t}
    env = environment()
    print(json.dumps(env), flush=True)
    rows = []
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(t) for t in args.lengths.split(",")]
    kinds = [k for k in args.kinds.split(",") if k] + [k for k in args.peer.split(",") if k]
    for kind in kinds:
        parse_kind(kind)  # a typo fails here, not after an hour of rows
    for kind in kinds:
        for T in lengths:
            rows.append(run_one(kind, T, max(args.tokens_per_step, T), args))
            # rewritten after every row: a run stopped by its time limit keeps what it measured
            (out / "model_bench.json").write_text(json.dumps({"environment": env, "args": vars(args), "rows": rows,
                                                              "targets": issue_targets(rows)}, indent=1, default=sorted))
    plot(rows, out / "model_bench.png")
    print(f"\n{'kind':14s} {'T':>6s} {'B':>3s} {'tok/s':>10s} {'MFU':>6s} {'peak GiB':>9s}")
    for r in rows:
        if "tok_s" in r:
            mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") else "   -  "
            print(f"{r['kind']:14s} {r['T']:6d} {r['B']:3d} {r['tok_s']:10.0f} {mfu} {r['peak_gib']:9.1f}")
        else:
            print(f"{r['kind']:14s} {r['T']:6d} {r['B']:3d} {r['error'][:70]}")
    for name, entry in issue_targets(rows).items():
        print(f"{name}: {entry}")


if __name__ == "__main__":
    main()
