"""The single-process trainer, top to bottom: data, model, optimizer, then the loop
(forward, backward, clip, step, log, evaluate, checkpoint), then a generated sample."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from ..config import JobConfig
from ..model.causal_lm import LinearMoEForCausalLM
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .data import TrainingData, open_training_data
from .metrics import MetricsLogger, plot_run
from .optim import build_optimizer, lr_at, set_lr
from .progress import Progress


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)          # training loss of every step run here
    eval_loss: float = float("nan")
    unigram_entropy: float = float("nan")
    sample: str = ""
    checkpoint: Path | None = None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; use train.device=cpu or auto")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
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
    model = LinearMoEForCausalLM(job.model).to(device)
    optimizer = build_optimizer(model, t)
    run_dir, start_step = new_run_dir(job), 0
    if resume:
        ckpt = resolve_checkpoint(resume)
        run_dir = ckpt.parent.parent
        start_step = load_checkpoint(ckpt, model, optimizer, map_location=device)["step"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(job.to_toml())
    steps = total_steps(job)
    say = (lambda *a: None) if quiet else print
    say(job.to_toml())
    say(f"# model: {model.num_parameters() / 1e6:.2f}M parameters, {model.num_active_parameters() / 1e6:.2f}M active per token; "
        f"device {device}; run dir {run_dir}" + (f"; resuming at step {start_step}" if start_step else ""))
    logger = MetricsLogger(run_dir)
    result = TrainResult(run_dir=run_dir, step=start_step, unigram_entropy=data.unigram_entropy)
    extra = {"tokenizer.json": data.tokenizer_path}
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
    amp = autocast_for(t.precision, device)
    model.train()
    last = time.perf_counter()
    with Progress(total=steps, start=start_step, enabled=not quiet) as progress:
        for step in range(start_step, steps):
            lr = lr_at(step, t, steps)
            set_lr(optimizer, lr)
            loss_sum, aux_sums = 0.0, {}
            for micro in range(t.grad_accum):
                x, y = data.train_batch(step * t.grad_accum + micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with amp:
                    out = model(x, labels=y)
                (out.loss / t.grad_accum).backward()
                loss_sum += out.lm_loss.item() / t.grad_accum
                for k, v in out.aux_losses.items():
                    aux_sums[k] = aux_sums.get(k, 0.0) + v.item() / t.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            now = time.perf_counter()
            tok_s = tokens_per_step / max(now - last, 1e-9)
            last = now
            result.losses.append(loss_sum)
            result.step = step + 1
            progress.update(step + 1, loss=loss_sum, tokens_per_s=tok_s)
            if (step + 1) % t.log_interval == 0 or step + 1 == steps:
                row = {"loss": loss_sum, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tok_s,
                       "tokens": (step + 1) * tokens_per_step, **aux_sums, **expert_load_metrics(model)}
                logger.log(step + 1, row)
            if t.eval_interval and (step + 1) % t.eval_interval == 0 and step + 1 < steps:
                result.eval_loss = evaluate(model, data, t.eval_batches, device, amp)
                logger.log(step + 1, {"eval_loss": result.eval_loss})
                progress.note(f"step {step + 1}: eval loss {result.eval_loss:.3f} (unigram entropy {data.unigram_entropy:.3f})")
            if (step + 1) % t.ckpt_interval == 0 and step + 1 < steps:
                save_checkpoint(run_dir, step + 1, model, optimizer, {"tokens": (step + 1) * tokens_per_step}, job.to_toml(),
                                t.keep_last, extra)
            if stop_after is not None and step + 1 >= stop_after:
                break
    if result.step == steps:
        result.eval_loss = evaluate(model, data, t.eval_batches, device, amp)
        logger.log(result.step, {"eval_loss": result.eval_loss})
    result.checkpoint = save_checkpoint(run_dir, result.step, model, optimizer, {"tokens": result.step * tokens_per_step},
                                        job.to_toml(), t.keep_last, extra)
    logger.close()
    plot_run(run_dir)
    if result.step == steps:
        result.sample = data.sample(model, t.sample_prompt, t.sample_tokens, device)
        say(f"eval loss {result.eval_loss:.3f} nats/token (unigram entropy of the corpus {data.unigram_entropy:.3f}); "
            f"checkpoint {result.checkpoint}")
        say("sample:", repr(result.sample))
    return result


@torch.no_grad()
def evaluate(model: LinearMoEForCausalLM, data: TrainingData, n_batches: int, device: torch.device, amp) -> float:
    model.eval()
    total = 0.0
    batches = data.eval_batches(n_batches)
    for x, y in batches:
        with amp:
            total += model(x.to(device), labels=y.to(device)).lm_loss.item()
    model.train()
    return total / max(1, len(batches))


def expert_load_metrics(model: LinearMoEForCausalLM) -> dict[str, float]:
    """Per MoE layer: the busiest expert's share over the mean share (1.0 = perfectly balanced)."""
    out = {}
    for i, layer in enumerate(model.layers):
        stats = getattr(layer.ffn, "last_stats", None) if layer.is_moe else None
        if stats is None:
            continue
        counts = stats["tokens_per_expert"] if isinstance(stats, dict) else stats.tokens_per_expert
        counts = counts.float()
        out[f"expert_load_max_over_mean/layer{i}"] = float(counts.max() / counts.mean().clamp_min(1e-9))
    return out
