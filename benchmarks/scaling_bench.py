"""Multi-GPU scaling (issue 10): LASP-2 sequence parallelism, expert parallelism, and combined layouts
against one GPU, on the A0.3B-2B preset. Every rank runs this script under torchrun:

    torchrun --standalone --nproc-per-node 8 benchmarks/scaling_bench.py [--parts sp,attention,ep,combined]
        [--sp 1,2,4,8] [--tokens-per-gpu 32768] [--ep 1,2,4,8] [--ep-seq-len 8192] [--steps 4] [--warmup 2]
    torchrun --standalone --nproc-per-node 4 benchmarks/scaling_bench.py --device cpu --tiny   # gloo smoke run

* ``sp``: pure Gated DeltaNet and the 3:1 hybrid, sp = 1, 2, 4, 8 with data parallelism (FSDP) over
  the rest of the ranks, ``tokens-per-gpu`` tokens per rank (one sequence of ``sp × tokens-per-gpu``
  per sp group): tokens/s per GPU and peak memory per GPU.
* ``attention``: the same sweep with every layer softmax attention (LASP-2H: all-gathered K/V).
* ``ep``: ep = 1, 2, 4, 8 with data parallelism over all ranks, one ``ep-seq-len`` sequence per rank:
  tokens/s per GPU and the share of the step spent in all-to-all (CUDA events around every
  ``all_to_all_single``: it includes waiting for the slowest peer).
* ``combined``: dp × tp × ep and pp=2 × dp train ``check-steps`` steps in fp32 from the same weights
  and batch as one process (rank 0 alone) and report the relative loss difference per step
  (aux loss off: a balance loss over each rank's tokens differs from the one over the whole batch).

Prints a table; rank 0 writes ``$OUT/scaling_bench.json`` (or ``benchmarks/results/``) with device,
versions, commit, shapes and numbers, and ``scaling_bench.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance.py beside this file
from provenance import git_commit, source_digest  # noqa: E402

from linear_moe.model.causal_lm import LinearMoEForCausalLM  # noqa: E402
from linear_moe.model.config import ModelConfig  # noqa: E402
from linear_moe.model.presets import model_preset  # noqa: E402
from linear_moe.parallel.config import ParallelConfig  # noqa: E402
from linear_moe.parallel.fsdp import clip_grad_norm_  # noqa: E402
from linear_moe.parallel.mesh import build_mesh  # noqa: E402
from linear_moe.parallel.parallelize import local_batch, parallelize_model, parallelize_pipeline  # noqa: E402

KINDS = {"gdn": ("gated_deltanet", "L"), "hybrid": ("gated_deltanet", "LLLN"), "attention": ("attention", "N")}


def model_config(kind: str, tiny: bool, aux: bool = True) -> ModelConfig:
    mixer, unit = KINDS[kind]
    if tiny:  # the shapes of A0.3B-2B, shrunk to run on CPU in seconds
        cfg = model_preset("tiny", mixer=mixer, hidden_size=32, num_layers=4, intermediate_size=64, vocab_size=256,
                           tie_embeddings=False)
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=8, expert_hidden_size=32),
                                  attention=dataclasses.replace(cfg.attention, num_heads=4))
    else:
        cfg = model_preset("A0.3B-2B", mixer=mixer)
    cfg = dataclasses.replace(cfg, layer_pattern=unit * (cfg.num_layers // len(unit)))
    if not aux:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, aux_loss_coef=0.0))
    return cfg.validate()


# ---- timing helpers ------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AllToAllTimer:
    """Wraps ``dist.all_to_all_single`` (what `moe.dispatch` calls) to add up its time on this rank."""

    def __init__(self, device: torch.device):
        self.device, self.events, self.seconds = device, [], 0.0

    @contextlib.contextmanager
    def active(self):
        inner = dist.all_to_all_single

        def timed(*args, **kwargs):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = inner(*args, **kwargs)
                end.record()
                self.events.append((start, end))
                return out
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            return out

        dist.all_to_all_single = timed
        try:
            yield self
        finally:
            dist.all_to_all_single = inner

    def total(self) -> float:
        sync(self.device)
        return self.seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1e3


def reduce(value: float, op=dist.ReduceOp.MAX, device=None) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t.item())


def global_batch(rows: int, seq: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random ``[rows, seq]`` tokens on every rank (and their next tokens)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, seq + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


# ---- throughput -----------------------------------------------------------------------------------

def throughput(part: str, kind: str, pcfg: ParallelConfig, seq: int, rows_per_dp: int, args, device) -> dict:
    """Train ``args.steps`` timed steps of ``kind`` under ``pcfg``; tokens/s per rank, peak memory, a2a share."""
    world = dist.get_world_size()
    row = {"part": part, "kind": kind, "sp": pcfg.sp, "ep": pcfg.ep, "seq_len": seq, "rows_per_dp": rows_per_dp,
           "tokens_per_gpu": seq * rows_per_dp // pcfg.sp}
    model = opt = None
    try:
        cfg = model_config(kind, args.tiny)
        mesh = build_mesh(pcfg, world, device_type=device.type, num_heads=cfg.attention.num_heads,
                          num_experts=cfg.moe.num_experts)
        torch.manual_seed(0)
        model = LinearMoEForCausalLM(cfg).to(device)
        ac = args.ac if seq >= args.ac_from else "none"
        parallelize_model(model, pcfg, mesh, activation_checkpointing=ac)
        row["activation_checkpointing"] = ac
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        ids, labels = global_batch(mesh.dp_size * rows_per_dp, seq, cfg.vocab_size, seed=1)
        ids, labels = local_batch(ids, mesh).to(device), local_batch(labels, mesh).to(device)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        timer = AllToAllTimer(device)

        def step():
            with amp:
                loss = model(ids, labels=labels, return_logits=False).loss
            loss.backward()
            clip_grad_norm_(model, 1.0, mesh)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        with timer.active():
            for _ in range(args.steps):
                step()
            sync(device)
        dt = (time.perf_counter() - t0) / args.steps
        a2a = timer.total() / args.steps
        dt = reduce(dt, device=device)  # the slowest rank sets the pace
        row["step_s"] = dt
        row["tokens_per_s_per_gpu"] = row["tokens_per_gpu"] / dt
        row["a2a_share"] = reduce(a2a / dt, dist.ReduceOp.SUM, device) / world
        if device.type == "cuda":
            row["peak_gib_per_gpu"] = reduce(torch.cuda.max_memory_allocated(device) / 2**30, device=device)
    except Exception as e:  # record and go on: an OOM in one configuration must not lose the rest
        row["error"] = repr(e)[:400]
        if args.verbose:
            traceback.print_exc()
    finally:
        model = opt = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ---- combined layouts against one process --------------------------------------------------------

def _one_process_losses(cfg, ids, labels, steps, device) -> list[float]:
    torch.manual_seed(0)
    model = LinearMoEForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = model(ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def combined(name: str, pcfg: ParallelConfig, args, device) -> dict:
    """Losses of ``check_steps`` steps under ``pcfg`` and in rank 0 alone, from the same weights and batch."""
    world, rows_per_dp = dist.get_world_size(), 4
    row = {"part": "combined", "layout": name, "seq_len": args.check_seq_len}
    try:
        cfg = model_config("hybrid", args.tiny, aux=False)
        mesh = build_mesh(pcfg, world, device_type=device.type, num_heads=cfg.attention.num_heads,
                          num_experts=cfg.moe.num_experts)
        ids, labels = global_batch(mesh.dp_size * rows_per_dp, args.check_seq_len, cfg.vocab_size, seed=2)
        box = [_one_process_losses(cfg, ids, labels, args.check_steps, device) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        torch.manual_seed(0)
        model = LinearMoEForCausalLM(cfg).to(device)
        my_ids, my_labels = local_batch(ids, mesh).to(device), local_batch(labels, mesh).to(device)
        if pcfg.pp > 1:
            model = parallelize_pipeline(model, pcfg, mesh, device)
        else:
            parallelize_model(model, pcfg, mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(args.check_steps):
            if pcfg.pp > 1:
                loss, _aux = model.train_step(my_ids, my_labels)
                holds = model.has_last
            else:
                out = model(my_ids, labels=my_labels)
                out.loss.backward()
                loss, holds = out.lm_loss.detach(), True
            clip_grad_norm_(model, 1.0, mesh)
            opt.step()
            opt.zero_grad(set_to_none=True)
            t = torch.stack([loss.double() * holds, torch.tensor(float(holds), dtype=torch.float64, device=device)])
            dist.all_reduce(t)  # the mean over the ranks holding a loss (tp peers hold the same one)
            losses.append(float(t[0] / t[1]))
        row.update(losses=losses, one_process=box[0],
                   max_rel_err=max(abs(a - b) / abs(b) for a, b in zip(losses, box[0])))
    except Exception as e:
        row["error"] = repr(e)[:400]
        if args.verbose:
            traceback.print_exc()
    return row


# ---- driver ---------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "world_size": dist.get_world_size(), "backend": dist.get_backend(), "torch": torch.__version__}
    with contextlib.suppress(ImportError):
        import triton

        env["triton"] = triton.__version__
    env["commit"], env["source_digest"] = git_commit(), source_digest()
    return env


def plan(args, world: int) -> list[tuple]:
    jobs = []
    parts = args.parts.split(",")
    for part, kinds in (("sp", ("gdn", "hybrid")), ("attention", ("attention",))):
        if part in parts:
            for kind in kinds:
                for sp in (s for s in args.sp if world % s == 0):
                    jobs.append(("throughput", part, kind, ParallelConfig(sp=sp, dp_shard=world // sp),
                                 args.tokens_per_gpu * sp, 1))
    if "ep" in parts:
        for ep in (e for e in args.ep if world % e == 0):
            jobs.append(("throughput", "ep", "hybrid", ParallelConfig(ep=ep, dp_shard=world), args.ep_seq_len, 1))
    if "combined" in parts:
        if world >= 4 and world % 4 == 0:
            jobs.append(("combined", "dp×tp×ep", ParallelConfig(tp=2, dp_shard=world // 2, ep=2)))
        if world % 2 == 0:
            jobs.append(("combined", "pp2×dp", ParallelConfig(pp=2, dp_shard=world // 2)))
    return jobs


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_sp, ax_ep) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in ("gdn", "hybrid", "attention"):
        pts = [(r["sp"], r["tokens_per_s_per_gpu"]) for r in rows if r.get("kind") == kind and r["part"] != "ep"
               and "tokens_per_s_per_gpu" in r]
        if pts:
            ax_sp.plot(*zip(*pts), marker="o", label=kind)
    ax_sp.set(xscale="log", xlabel="sp (LASP-2 ranks per sequence)", ylabel="tokens/s per GPU", title="sequence parallel")
    ax_sp.set_xscale("log", base=2)
    ax_sp.legend()
    pts = [(r["ep"], r["tokens_per_s_per_gpu"], r["a2a_share"]) for r in rows if r["part"] == "ep" and "a2a_share" in r]
    if pts:
        ep, tok, share = zip(*pts)
        ax_ep.plot(ep, tok, marker="o", label="tokens/s per GPU")
        ax_ep.set_xscale("log", base=2)
        twin = ax_ep.twinx()
        twin.plot(ep, [100 * s for s in share], marker="s", color="tab:red", label="all-to-all share")
        twin.set_ylabel("all-to-all % of step")
    ax_ep.set(xlabel="ep", ylabel="tokens/s per GPU", title="expert parallel")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = [f"{'part':10s} {'kind/layout':12s} {'sp':>3s} {'ep':>3s} {'seq':>7s} {'tok/s/GPU':>11s} {'GiB/GPU':>8s} "
             f"{'a2a %':>6s}  notes"]
    for r in rows:
        if r["part"] == "combined":
            note = r.get("error") or f"max rel loss err vs 1 process {r['max_rel_err']:.2e} over {len(r['losses'])} steps"
            lines.append(f"{'combined':10s} {r['layout']:12s} {'':>3s} {'':>3s} {r['seq_len']:7d} {'':>11s} {'':>8s} {'':>6s}  {note}")
            continue
        tok = f"{r['tokens_per_s_per_gpu']:11.0f}" if "tokens_per_s_per_gpu" in r else f"{'-':>11s}"
        mem = f"{r['peak_gib_per_gpu']:8.1f}" if "peak_gib_per_gpu" in r else f"{'-':>8s}"
        a2a = f"{100 * r['a2a_share']:6.1f}" if "a2a_share" in r else f"{'-':>6s}"
        lines.append(f"{r['part']:10s} {r['kind']:12s} {r['sp']:3d} {r['ep']:3d} {r['seq_len']:7d} {tok} {mem} {a2a}  "
                     f"{r.get('error', '')[:60]}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny model and lengths (CPU smoke run)")
    p.add_argument("--parts", default="sp,attention,ep,combined")
    p.add_argument("--sp", default="1,2,4,8")
    p.add_argument("--ep", default="1,2,4,8")
    p.add_argument("--tokens-per-gpu", type=int, default=32768)
    p.add_argument("--ep-seq-len", type=int, default=8192)
    p.add_argument("--check-seq-len", type=int, default=512)
    p.add_argument("--check-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ac", default="selective", help="activation checkpointing at long sequences")
    p.add_argument("--ac-from", type=int, default=32768, help="sequence length from which --ac applies")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    if args.tiny:
        args.tokens_per_gpu, args.ep_seq_len, args.check_seq_len = 64, 64, 16
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    args.sp = [int(s) for s in args.sp.split(",") if s]
    args.ep = [int(e) for e in args.ep.split(",") if e]
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # the combined-layout loss check is in fp32
        torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=20))
    rank, world = dist.get_rank(), dist.get_world_size()
    env = environment(device)
    rows = []
    for job in plan(args, world):
        row = throughput(*job[1:], args, device) if job[0] == "throughput" else combined(job[1], job[2], args, device)
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0:
        print("\n" + table(rows))
        out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
        out.mkdir(parents=True, exist_ok=True)
        args_json = {k: v for k, v in vars(args).items()}
        (out / "scaling_bench.json").write_text(json.dumps({"environment": env, "args": args_json, "rows": rows}, indent=1))
        with contextlib.suppress(ImportError):
            plot(rows, out / "scaling_bench.png")
        print(f"wrote {out / 'scaling_bench.json'}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
