"""The single-process trainer, top to bottom: data, model, optimizer, then the loop
(forward, backward, clip, step, log, evaluate, checkpoint), then a generated sample."""
from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from ..config import JobConfig
from ..model.causal_lm import LinearMoEForCausalLM
from ..moe import collect_expert_load, plot_expert_load, update_moe_biases
from ..parallel.activation_checkpoint import apply_activation_checkpointing
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .data import TrainingData, open_training_data
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


def build_model(job: JobConfig, device: torch.device) -> LinearMoEForCausalLM:
    model = LinearMoEForCausalLM(job.model).to(device)
    apply_activation_checkpointing(model, job.train.activation_checkpointing)
    if job.train.compile:
        for block in model.layers:
            block.compile()
    return model


def train(job: JobConfig, resume: str | Path | None = None, quiet: bool = False,
          stop_after: int | None = None) -> TrainResult:
    """Run (or resume) training. ``stop_after`` ends the loop early after that step (tests use it to
    simulate an interrupted run)."""
    t = job.train
    job.validate()
    if t.threads:
        torch.set_num_threads(t.threads)
    device = pick_device(t.device)
    torch.manual_seed(t.seed)
    data: TrainingData = open_training_data(job)
    model = build_model(job, device)
    optimizer = build_optimizer(model, t)
    run_dir, start_step, skipped = new_run_dir(job), 0, 0
    if resume:
        ckpt = resolve_checkpoint(resume)
        run_dir = ckpt.parent.parent
        state = load_checkpoint(ckpt, model, optimizer, map_location=device)
        start_step, skipped = state["step"], state.get("skipped_steps", 0)
        data.load_state_dict(state.get("data", {}))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(job.to_toml())
    steps = total_steps(job)
    say = (lambda *a: None) if quiet else print
    say(job.to_toml())
    flops_per_token = training_flops_per_token(model, t.seq_len)
    peak = peak_flops(device)
    say(f"# model: {model.num_parameters() / 1e6:.2f}M parameters, {model.num_active_parameters() / 1e6:.2f}M active per token, "
        f"{flops_per_token / 1e6:.1f} MFLOPs per training token; device {device}; run dir {run_dir}"
        + (f"; resuming at step {start_step}" if start_step else ""))
    logger = MetricsLogger(run_dir, wandb_project=t.wandb_project, config=job.to_dict())
    result = TrainResult(run_dir=run_dir, step=start_step, unigram_entropy=data.unigram_entropy, skipped_steps=skipped)
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
    extra = {"tokenizer.json": data.tokenizer_path}

    def save(step: int) -> Path:
        return save_checkpoint(run_dir, step, model, optimizer, {"tokens": step * tokens_per_step, "skipped_steps": result.skipped_steps,
                                                                   "data": data.state_dict()},
                               job.to_toml(), t.keep_last, extra)

    amp = autocast_for(t.precision, device)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    last = time.perf_counter()
    with Progress(total=steps, start=start_step, enabled=not quiet) as progress, _StopSignal() as stop:
        for step in range(start_step, steps):
            lr = lr_at(step, t, steps)
            set_lr(optimizer, lr)
            loss_sum, aux_sums = 0.0, {}
            for micro in range(t.grad_accum):
                batch = data.train_batch(step * t.grad_accum + micro).to(device)
                with amp:
                    out = model(batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens, return_logits=False)
                (out.loss / t.grad_accum).backward()
                loss_sum += out.lm_loss.item() / t.grad_accum
                for k, v in out.aux_losses.items():
                    aux_sums[k] = aux_sums.get(k, 0.0) + v.item() / t.grad_accum
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf")))
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                # A bad batch or a spike: drop this update, keep the weights, count it.
                optimizer.zero_grad(set_to_none=True)
                result.skipped_steps += 1
                logger.log(step + 1, {"skipped_nonfinite": 1, "loss": loss_sum, "grad_norm": grad_norm})
                if result.skipped_steps > t.max_skipped_steps:
                    logger.close()
                    last_good = list_checkpoints(run_dir)
                    raise TrainingDiverged(
                        f"step {step + 1}: {result.skipped_steps} steps with a non-finite loss or gradient "
                        f"(train.max_skipped_steps={t.max_skipped_steps}); last good checkpoint: "
                        f"{last_good[-1] if last_good else 'none'}")
                result.step = step + 1
                continue
            optimizer.step()
            update_moe_biases(model)
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
                    row["mfu"] = tok_s * flops_per_token / peak
                if device.type == "cuda":
                    row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                load = collect_expert_load(model)
                if load.numel():
                    row["expert_load"] = load.tolist()
                    share = load / load.sum(-1, keepdim=True).clamp_min(1e-9)
                    row["expert_load_max_over_mean"] = float((share.max(-1).values * load.shape[-1]).mean())
                logger.log(step + 1, row)
                progress.note(format_row(step + 1, row))
            if t.eval_interval and (step + 1) % t.eval_interval == 0 and step + 1 < steps:
                result.eval_loss = evaluate(model, data, t.eval_batches, device, amp)
                logger.log(step + 1, {"eval_loss": result.eval_loss})
                progress.note(f"step {step + 1}: eval loss {result.eval_loss:.3f} (unigram entropy {data.unigram_entropy:.3f})")
            if stop.received is not None:
                result.stopped_by_signal = True
                break
            if (step + 1) % t.ckpt_interval == 0 and step + 1 < steps:
                save(step + 1)
            if stop_after is not None and step + 1 >= stop_after:
                break
    finished = result.step == steps
    if finished:
        result.eval_loss = evaluate(model, data, t.eval_batches, device, amp)
        logger.log(result.step, {"eval_loss": result.eval_loss})
    result.checkpoint = save(result.step)
    logger.close()
    plot_run(run_dir)
    history = [r["expert_load"] for r in read_metrics(logger.path) if "expert_load" in r]
    if history and len({len(h) for h in history}) == 1:
        with contextlib.suppress(ImportError):
            plot_expert_load(history, run_dir / "expert_load.png")
    if result.stopped_by_signal:
        say(f"stopped by signal {stop.received} after step {result.step}; checkpoint {result.checkpoint} (resume with --resume)")
    if finished:
        result.sample = data.sample(model, t.sample_prompt, t.sample_tokens, device)
        say(f"eval loss {result.eval_loss:.3f} nats/token (unigram entropy of the corpus {data.unigram_entropy:.3f}); "
            f"checkpoint {result.checkpoint}")
        say("sample:", repr(result.sample))
    return result


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
def evaluate(model: LinearMoEForCausalLM, data: TrainingData, n_batches: int, device: torch.device, amp) -> float:
    model.eval()
    total = 0.0
    batches = data.eval_batches(n_batches)
    for batch in batches:
        batch = batch.to(device)
        with amp:
            total += model(batch.input_ids, labels=batch.labels, return_logits=False).lm_loss.item()
    model.train()
    return total / max(1, len(batches))
