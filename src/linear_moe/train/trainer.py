"""The single-process trainer, top to bottom: data, model, optimizer, then the loop
(forward, backward, clip, step, log, evaluate, checkpoint), then a generated sample."""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import JobConfig
from ..model.causal_lm import LinearMoEForCausalLM
from ..moe import collect_expert_load, plot_expert_load, update_moe_biases
from ..parallel.activation_checkpoint import apply_activation_checkpointing
from ..parallel.fsdp import clip_grad_norm_
from ..parallel.lasp2 import shard_sequence
from ..parallel.parallelize import local_cu_seqlens, parallelize_model
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .data import Batch, TrainingData, open_training_data
from .distributed import Distributed, init_distributed
from .flops import peak_flops, training_flops_per_token
from .metrics import MetricsLogger, plot_run, read_metrics
from .optim import build_optimizer, lr_at, set_lr
from .progress import Progress


class TrainingDiverged(RuntimeError):
    """Too many steps with a non-finite loss or gradient; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)          # training loss of every step run here
    eval_loss: float = float("nan")
    unigram_entropy: float = float("nan")
    sample: str = ""
    checkpoint: Path | None = None
    skipped_steps: int = 0
    stopped_by_signal: bool = False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; use train.device=cpu or auto")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast (weights and optimizer state stay fp32), or nothing."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def total_steps(job: JobConfig) -> int:
    t = job.train
    if t.max_tokens:
        return math.ceil(t.max_tokens / (t.batch_size * t.seq_len * t.grad_accum))
    return t.max_steps


def new_run_dir(job: JobConfig) -> Path:
    name = job.train.run_name or f"{job.preset}-{job.model.mixer}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(job.train.output_dir) / name


def latest_run(output_dir: str | Path) -> Path:
    """The most recently written run directory under ``output_dir`` that holds a checkpoint."""
    root = Path(output_dir)
    runs = [p for p in root.iterdir() if list_checkpoints(p)] if root.is_dir() else []
    if not runs:
        raise CheckpointError(f"--resume: no run with a checkpoint under {str(root)!r}; pass a run or checkpoint directory")
    return max(runs, key=lambda p: list_checkpoints(p)[-1].stat().st_mtime)


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the end of the current step and exits."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers (e.g. inside a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def build_model(job: JobConfig, device: torch.device, ctx: Distributed) -> LinearMoEForCausalLM:
    """The plain model, then (under torchrun) tensor / expert / sequence parallelism, activation
    checkpointing and FSDP2 applied from outside; then per-block compile."""
    torch.manual_seed(job.train.seed)  # every rank starts from the same weights
    model = LinearMoEForCausalLM(job.model).to(device)
    if ctx.enabled:
        parallelize_model(model, job.parallel, ctx.mesh, activation_checkpointing=job.train.activation_checkpointing)
    else:
        apply_activation_checkpointing(model, job.train.activation_checkpointing)
    if job.train.compile:
        for block in model.layers:
            block.compile(backend=job.train.compile_backend)
    return model


def train(job: JobConfig, resume: str | Path | None = None, quiet: bool = False,
          stop_after: int | None = None) -> TrainResult:
    """Run (or resume) training, in one process or under torchrun (every rank calls this). ``stop_after``
    ends the loop early after that step (tests use it to simulate an interrupted run)."""
    t = job.train
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    job.validate(world_size=world)
    if t.threads:
        torch.set_num_threads(t.threads)
    ctx = init_distributed(job, pick_device(t.device))
    device, mesh = ctx.device if ctx.enabled else pick_device(t.device), ctx.mesh
    sp, sp_rank = job.parallel.sp, mesh.sp_rank
    data: TrainingData = open_training_data(job, mesh.dp_rank, mesh.dp_size)
    model = build_model(job, device, ctx)
    plain_sizes = _sizes(job)
    optimizer = build_optimizer(model, t)
    run_dir, start_step, skipped = ctx.broadcast(new_run_dir(job)), 0, 0
    if resume:
        ckpt = resolve_checkpoint(resume)
        run_dir = ckpt.parent.parent
        state = load_checkpoint(ckpt, model, optimizer, map_location=device)
        start_step, skipped = state["step"], state.get("skipped_steps", 0)
        data.load_state_dict(state.get("data", {}))
    steps = total_steps(job)
    say = print if ctx.is_main and not quiet else (lambda *a: None)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(job.to_toml())
    say(job.to_toml())
    params, active, flops_per_token = plain_sizes
    peak = peak_flops(device)
    say(f"# model: {params / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token, "
        f"{flops_per_token / 1e6:.1f} MFLOPs per training token; device {device}"
        + (f" × {ctx.world} ranks ({_layout(job, ctx)})" if ctx.enabled else "") + f"; run dir {run_dir}"
        + (f"; resuming at step {start_step}" if start_step else ""))
    logger = MetricsLogger(run_dir, wandb_project=t.wandb_project, config=job.to_dict()) if ctx.is_main else None
    result = TrainResult(run_dir=run_dir, step=start_step, unigram_entropy=data.unigram_entropy, skipped_steps=skipped)
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * mesh.dp_size   # global
    extra = {"tokenizer.json": data.tokenizer_path}

    def log(step: int, row: dict) -> None:
        if logger is not None:
            logger.log(step, row)

    def save(step: int) -> Path:
        return save_checkpoint(run_dir, step, model, optimizer, {"tokens": step * tokens_per_step, "skipped_steps": result.skipped_steps,
                                                                   "data": data.state_dict()},
                               job.to_toml(), t.keep_last, extra)

    def local(batch: Batch) -> Batch:
        """This rank's slice of the time axis under sequence parallelism (LASP-2 joins the pieces)."""
        if sp == 1:
            return batch
        cu = local_cu_seqlens(model, batch.cu_seqlens, batch.input_ids.shape[1]) if batch.cu_seqlens is not None else None
        return Batch(shard_sequence(batch.input_ids, sp_rank, sp), shard_sequence(batch.labels, sp_rank, sp), cu)

    amp = autocast_for(t.precision, device)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    last = time.perf_counter()
    with Progress(total=steps, start=start_step, enabled=ctx.is_main and not quiet) as progress, _StopSignal() as stop:
        for step in range(start_step, steps):
            lr = lr_at(step, t, steps)
            set_lr(optimizer, lr)
            loss_sum, aux_sums = 0.0, {}
            for micro in range(t.grad_accum):
                batch = local(data.train_batch(step * t.grad_accum + micro)).to(device)
                with amp:
                    out = model(batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens, return_logits=False)
                (out.loss / t.grad_accum).backward()
                loss_sum += out.lm_loss.item() / t.grad_accum
                for k, v in out.aux_losses.items():
                    aux_sums[k] = aux_sums.get(k, 0.0) + v.item() / t.grad_accum
            max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
            grad_norm = float(clip_grad_norm_(model, max_norm, mesh) if ctx.enabled
                              else torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            loss_sum = ctx.mean(loss_sum)  # every rank sees the same value: they skip or step together
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                # A bad batch or a spike: drop this update, keep the weights, count it.
                optimizer.zero_grad(set_to_none=True)
                result.skipped_steps += 1
                log(step + 1, {"skipped_nonfinite": 1, "loss": loss_sum, "grad_norm": grad_norm})
                if result.skipped_steps > t.max_skipped_steps:
                    if logger is not None:
                        logger.close()
                    last_good = list_checkpoints(run_dir)
                    raise TrainingDiverged(
                        f"step {step + 1}: {result.skipped_steps} steps with a non-finite loss or gradient "
                        f"(train.max_skipped_steps={t.max_skipped_steps}); last good checkpoint: "
                        f"{last_good[-1] if last_good else 'none'}")
                result.step = step + 1
                continue
            optimizer.step()
            update_moe_biases(model, mesh.group("dp_sp") if ctx.enabled else None)
            optimizer.zero_grad(set_to_none=True)
            now = time.perf_counter()
            tok_s = tokens_per_step / max(now - last, 1e-9)
            last = now
            result.losses.append(loss_sum)
            result.step = step + 1
            progress.update(step + 1, loss=loss_sum, tokens_per_s=tok_s)
            if (step + 1) % t.log_interval == 0 or step + 1 == steps:
                row = {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
                       "tokens": (step + 1) * tokens_per_step, **aux_sums}
                if peak:
                    row["mfu"] = tok_s * flops_per_token / (peak * ctx.world)
                if device.type == "cuda":
                    row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                load = collect_expert_load(model)
                if load.numel():
                    row["expert_load"] = load.tolist()
                    share = load / load.sum(-1, keepdim=True).clamp_min(1e-9)
                    row["expert_load_max_over_mean"] = float((share.max(-1).values * load.shape[-1]).mean())
                log(step + 1, row)
                progress.note(format_row(step + 1, row))
            if t.eval_interval and (step + 1) % t.eval_interval == 0 and step + 1 < steps:
                result.eval_loss = evaluate(model, data, t.eval_batches, device, amp, ctx, local)
                log(step + 1, {"eval_loss": result.eval_loss})
                progress.note(f"step {step + 1}: eval loss {result.eval_loss:.3f} (unigram entropy {data.unigram_entropy:.3f})")
            if ctx.broadcast(stop.received) is not None:
                result.stopped_by_signal = True
                break
            if (step + 1) % t.ckpt_interval == 0 and step + 1 < steps:
                save(step + 1)
            if stop_after is not None and step + 1 >= stop_after:
                break
    finished = result.step == steps
    if finished:
        result.eval_loss = evaluate(model, data, t.eval_batches, device, amp, ctx, local)
        log(result.step, {"eval_loss": result.eval_loss})
    result.checkpoint = save(result.step)
    if logger is not None:
        logger.close()
        plot_run(run_dir)
        history = [r["expert_load"] for r in read_metrics(logger.path) if "expert_load" in r]
        if history and len({len(h) for h in history}) == 1:
            with contextlib.suppress(ImportError):
                plot_expert_load(history, run_dir / "expert_load.png")
    if result.stopped_by_signal:
        say(f"stopped by signal {stop.received} after step {result.step}; checkpoint {result.checkpoint} (resume with --resume)")
    if finished:
        say(f"eval loss {result.eval_loss:.3f} nats/token (unigram entropy of the corpus {data.unigram_entropy:.3f}); "
            f"checkpoint {result.checkpoint}")
        if ctx.enabled:
            say(f"sample: linear-moe generate --checkpoint {result.checkpoint} --prompt {t.sample_prompt!r}")
        else:
            result.sample = data.sample(model, t.sample_prompt, t.sample_tokens, device)
            say("sample:", repr(result.sample))
    return result


def _sizes(job: JobConfig) -> tuple[int, int, float]:
    """Parameters, active parameters and training FLOPs per token of the unsharded model (built on meta)."""
    with torch.device("meta"):
        model = LinearMoEForCausalLM(job.model)
    flops = training_flops_per_token(model, job.train.seq_len)
    return model.num_parameters(), model.num_active_parameters(), flops


def _layout(job: JobConfig, ctx: Distributed) -> str:
    p = ctx.mesh.cfg
    return f"dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} tp={p.tp} sp={p.sp} ep={p.ep}"


def format_row(step: int, row: dict) -> str:
    """One console line per logged step."""
    parts = [f"step {step}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}", f"grad {row['grad_norm']:.3f}",
             f"{row['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in row:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    if "peak_memory_gib" in row:
        parts.append(f"mem {row['peak_memory_gib']:.1f} GiB")
    if "moe_balance_loss" in row:
        parts.append(f"balance {row['moe_balance_loss']:.4f}")
    if "expert_load_max_over_mean" in row:
        parts.append(f"max/mean expert load {row['expert_load_max_over_mean']:.2f}")
    return " | ".join(parts)


@torch.no_grad()
def evaluate(model: LinearMoEForCausalLM, data: TrainingData, n_batches: int, device: torch.device, amp,
             ctx: Distributed | None = None, local=lambda b: b) -> float:
    """Mean held-out loss; under torchrun every rank scores its slice and the means are averaged."""
    model.eval()
    total = 0.0
    batches = data.eval_batches(n_batches)
    for batch in batches:
        batch = local(batch).to(device)
        with amp:
            total += model(batch.input_ids, labels=batch.labels, return_logits=False).lm_loss.item()
    model.train()
    mean = total / max(1, len(batches))
    return ctx.mean(mean) if ctx is not None else mean
