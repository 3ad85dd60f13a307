"""The trainer, top to bottom: data, model, optimizer, then the loop (forward, backward, clip, step,
log, evaluate, checkpoint), then a generated sample. One process, or every rank under torchrun; with
pipeline parallelism the model is this rank's `PipelineModel` and its schedule runs forward and backward.

The step does not wait for the device: loss, aux losses and gradient norm stay device tensors, kept
by `StepLog` and read back at logging and checkpoint steps only. The non-finite guard still skips a bad
update exactly: a fused AdamW skips it on the device (``found_inf``, as the AMP grad scaler does); other
optimizers (the CPU default) read one flag per step.
"""
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

from ..config import ConfigError, JobConfig
from ..model.causal_lm import LinearMoEForCausalLM
from ..moe import collect_expert_load, plot_expert_load, update_moe_biases
from ..moe.experts import cast_expert_weights_once
from ..ops.backends import fla_version
from ..parallel.activation_checkpoint import apply_activation_checkpointing
from ..parallel.blocks import blocks
from ..parallel.fsdp import clip_grad_norm_
from ..parallel.lasp2 import shard_sequence
from ..parallel.parallelize import local_cu_seqlens, parallelize_model, parallelize_pipeline
from ..parallel.pipeline import AUX_NAMES, PipelineModel
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .cuda_graph import GraphedStep
from .data import Batch, TrainingData, open_training_data
from .distributed import Distributed, StepLog, init_distributed
from .flops import peak_flops, training_flops_per_token
from .metrics import MetricsLogger, plot_run, read_metrics
from .optim import build_optimizer, lr_as_float, lr_as_tensor, lr_at, set_lr
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


def build_model(job: JobConfig, device: torch.device, ctx: Distributed) -> LinearMoEForCausalLM | PipelineModel:
    """The plain model, then (under torchrun) pipeline stages and tensor / expert / sequence parallelism,
    activation checkpointing and FSDP2 applied from outside; then per-block compile."""
    torch.manual_seed(job.train.seed)  # every rank starts from the same weights
    # drawn on the device itself: A0.3B-2B's 2.5B fp32 weights took 81 s to initialise on a 2-core CPU
    with torch.device(device):
        model = LinearMoEForCausalLM(job.model)
    ac = job.train.activation_checkpointing
    if ctx.enabled and job.parallel.pp > 1:
        model = parallelize_pipeline(model, job.parallel, ctx.mesh, device, options=job.parallel.options(),
                                     activation_checkpointing=ac)
    elif ctx.enabled:
        parallelize_model(model, job.parallel, ctx.mesh, options=job.parallel.options(), activation_checkpointing=ac)
    else:
        apply_activation_checkpointing(model, ac)
    if job.train.compile:
        for block in blocks(model):
            block.compile(backend=job.train.compile_backend)
    return model


def forward_backward(model, batches: list[Batch], amp) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one optimizer step's micro-batches (already on the device and sliced
    for this rank). Returns this rank's mean ``(lm_loss [], aux [len(AUX_NAMES)])``, device tensors."""
    if isinstance(model, PipelineModel):  # the schedule cuts the batch into its microbatches
        (batch,) = batches
        with amp:
            return model.train_step(batch.input_ids, batch.labels)
    lm, aux = 0.0, 0.0
    for batch in batches:
        with amp:
            out = model(batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens, return_logits=False)
        (out.loss / len(batches)).backward()
        lm = lm + out.lm_loss.detach().float() / len(batches)
        aux = aux + torch.stack([out.aux_losses[n].detach().float() if n in out.aux_losses else out.lm_loss.new_zeros((), dtype=torch.float32)
                                 for n in AUX_NAMES]) / len(batches)
    return lm, aux


def _graphed_step(model, optimizer, amp, max_norm: float) -> GraphedStep:
    """One process's step (micro-batches, clipping, the device-side non-finite skip, AdamW, the MoE bias
    step) as a ``GraphedStep``: eager for two steps, then captured and replayed."""
    if isinstance(amp, torch.autocast):  # no cast cache across the graph boundary
        amp = torch.autocast(amp.device, dtype=amp.fast_dtype, cache_enabled=False)

    def body(batches):
        optimizer.zero_grad(set_to_none=True)
        loss, aux = forward_backward(model, batches, amp)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        finite = torch.isfinite(grad_norm)
        step_unless_nonfinite(optimizer, finite)  # fused AdamW: decided on the device
        update_moe_biases(model, None)
        return loss, aux, grad_norm, finite

    return GraphedStep(body)


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> bool | None:
    """``optimizer.step()`` when ``finite`` (a device bool) holds, else leave weights and optimizer state
    as they are. A fused Adam(W) does this on the device (its ``found_inf`` input, which also undoes the
    step count) and None is returned: nothing was read back. Other optimizers cannot, so the flag is
    read (one host sync per step) and returned."""
    if optimizer.defaults.get("fused"):
        optimizer.grad_scale, optimizer.found_inf = None, (~finite).float()
        optimizer.step()
        return None
    ok = bool(finite)
    if ok:
        optimizer.step()
    return ok


def out_of_memory_hint(job: JobConfig) -> str:
    """What to change when a training step runs out of device memory, cheapest in speed first."""
    t, m = job.train, job.model
    hints = []
    if t.activation_checkpointing != "full" and "E" in m.resolved_ffn_pattern() and not m.moe.expert_recompute:
        hints.append(f"--model.moe.expert_recompute true (the MoE layers re-gather their routed rows in backward: "
                     f"{m.moe.top_k * (m.hidden_size + m.moe.expert_hidden_size)} fewer saved values per token and MoE "
                     "layer, ~4% slower layers)")
    if t.activation_checkpointing != "full":
        nxt = "selective" if t.activation_checkpointing == "none" else "full"
        hints.append(f"--train.activation_checkpointing {nxt} (now {t.activation_checkpointing})")
    if t.batch_size > 1:
        hints.append(f"--train.batch_size {t.batch_size // 2} --train.grad_accum {2 * t.grad_accum} (the same tokens per step)")
    hints.append("`linear-moe train --dry-run` with the same options prints the memory estimate")
    return "to fit, try: " + "; or ".join(hints)


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
    if t.eval_batches:
        data.batcher.check_eval()  # now, not at the final evaluation after hours of training
    if t.cuda_graph and (device.type != "cuda" or ctx.enabled):
        raise ConfigError(f"train.cuda_graph needs one CUDA device in one process (device {device}, "
                          f"{ctx.world if ctx.enabled else 1} ranks); leave it off otherwise")
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
        if t.cuda_graph:  # the loaded param groups hold a float lr (see save): back to the device tensor
            lr_as_tensor(optimizer, device)
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
    linear = job.model.mixer != "attention" and (not job.model.layer_pattern or set(job.model.layer_pattern) & set("LM"))
    if device.type == "cuda" and fla_version() and linear:
        say("# the first step compiles and autotunes fla's Triton kernels: 1-3 minutes per mixer on a new machine, "
            "cached in $TRITON_CACHE_DIR (~/.triton/cache) for later runs")
    logger = MetricsLogger(run_dir, wandb_project=t.wandb_project, config=job.to_dict()) if ctx.is_main else None
    result = TrainResult(run_dir=run_dir, step=start_step, unigram_entropy=data.unigram_entropy, skipped_steps=skipped)
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * mesh.dp_size   # global
    extra = {"tokenizer.json": data.tokenizer_path}

    def log(step: int, row: dict) -> None:
        if logger is not None:
            logger.log(step, row)

    def save(step: int) -> Path:
        with lr_as_float(optimizer):  # a checkpoint holds plain numbers, whatever the step's form
            return save_checkpoint(run_dir, step, model, optimizer, {"tokens": step * tokens_per_step,
                                                                       "skipped_steps": result.skipped_steps,
                                                                       "data": data.state_dict()},
                                   job.to_toml(), t.keep_last, extra)

    def local(batch: Batch) -> Batch:
        """This rank's slice of the time axis under sequence parallelism (LASP-2 joins the pieces)."""
        if sp == 1:
            return batch
        cu = local_cu_seqlens(model, batch.cu_seqlens, batch.input_ids.shape[1]) if batch.cu_seqlens is not None else None
        return Batch(shard_sequence(batch.input_ids, sp_rank, sp), shard_sequence(batch.labels, sp_rank, sp), cu)

    amp = autocast_for(t.precision, device)
    if t.cast_weights_once and isinstance(amp, torch.autocast):
        cast_expert_weights_once(model, optimizer)  # one bf16 copy per optimizer step, reused by every micro-batch
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pipeline = isinstance(model, PipelineModel)
    steplog = StepLog(ctx, AUX_NAMES, contributes=model.has_last if pipeline else True)
    aux_logged = _aux_names(job)
    max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
    interval_start, interval_steps, tok_s, shown_loss = time.perf_counter(), 0, 0.0, float("nan")
    graphed = _graphed_step(model, optimizer, amp, max_norm) if t.cuda_graph else None

    def read_back(step: int, log_now: bool) -> None:
        """Read the steps kept since the last read (one collective, one host copy); log them."""
        nonlocal interval_start, interval_steps, tok_s, shown_loss
        rows = steplog.flush()
        now = time.perf_counter()
        tok_s = tokens_per_step * interval_steps / max(now - interval_start, 1e-9)
        interval_start, interval_steps = now, 0
        for r in rows:
            if not r["finite"]:
                # A bad batch or a spike: the update was dropped, the weights kept.
                result.skipped_steps += 1
                log(r["step"], {"skipped_nonfinite": 1, "loss": r["loss"], "grad_norm": r["grad_norm"]})
                if result.skipped_steps > t.max_skipped_steps:
                    if logger is not None:
                        logger.close()
                    last_good = list_checkpoints(run_dir)
                    raise TrainingDiverged(
                        f"step {r['step']}: {result.skipped_steps} steps with a non-finite loss or gradient "
                        f"(train.max_skipped_steps={t.max_skipped_steps}); last good checkpoint: "
                        f"{last_good[-1] if last_good else 'none'}")
                continue
            result.losses.append(r["loss"])
            shown_loss = r["loss"]
        good = [r for r in rows if r["finite"]]
        if log_now and good and good[-1]["step"] == step:
            r = good[-1]
            row = {"loss": r["loss"], "lr": r["lr"], "grad_norm": r["grad_norm"], "tokens_per_s": tok_s,
                   "tokens": step * tokens_per_step,
                   **{k: v for k, v in r["aux"].items() if k in aux_logged or v != 0.0}}
            if peak:
                row["mfu"] = tok_s * flops_per_token / (peak * ctx.world)
            if device.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            load = _expert_load(model, ctx)
            if load.numel():
                row["expert_load"] = load.tolist()
                share = load / load.sum(-1, keepdim=True).clamp_min(1e-9)
                row["expert_load_max_over_mean"] = float((share.max(-1).values * load.shape[-1]).mean())
            log(step, row)
            progress.note(format_row(step, row))

    with Progress(total=steps, start=start_step, enabled=ctx.is_main and not quiet) as progress, _StopSignal() as stop:
        for step in range(start_step, steps):
            lr = lr_at(step, t, steps)
            set_lr(optimizer, lr)
            batches = [_to_device(local(data.train_batch(step * t.grad_accum + micro)), device) for micro in range(t.grad_accum)]
            try:
                if graphed is not None:  # the same step, replayed as one CUDA graph (_graphed_step)
                    loss, aux, grad_norm, finite = graphed(batches)
                    stepped = None
                else:
                    loss, aux = forward_backward(model, batches, amp)
            except torch.OutOfMemoryError as e:
                raise torch.OutOfMemoryError(f"step {step + 1}: {e}\n{out_of_memory_hint(job)}") from e
            if graphed is None:
                grad_norm = (clip_grad_norm_(model, max_norm, mesh) if ctx.enabled
                             else torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
                # The norm is reduced over every mesh and stage, so this flag is the same on every rank and
                # they skip or step together; a non-finite loss gives non-finite gradients.
                finite = torch.isfinite(grad_norm)
                stepped = step_unless_nonfinite(optimizer, finite)
                if stepped is not False:  # None: the device decided; the bias step uses token counts only
                    update_moe_biases(model, mesh.group("dp_sp") if ctx.enabled else None)
                optimizer.zero_grad(set_to_none=True)
            steplog.add(step + 1, lr, loss, aux, grad_norm, finite)
            result.step, interval_steps = step + 1, interval_steps + 1
            log_now = (step + 1) % t.log_interval == 0 or step + 1 == steps
            ckpt_now = (step + 1) % t.ckpt_interval == 0 and step + 1 < steps
            # The stop flag is agreed on at the steps that read back anyway (and at every step when the
            # step already read its flag, or in one process, where reading it costs nothing).
            check_stop = not ctx.enabled or stepped is not None or log_now or ckpt_now
            if log_now or ckpt_now:
                read_back(step + 1, log_now)
            progress.update(step + 1, loss=shown_loss, tokens_per_s=tok_s)
            if t.eval_batches and t.eval_interval and (step + 1) % t.eval_interval == 0 and step + 1 < steps:
                result.eval_loss = evaluate(model, data, t.eval_batches, device, amp, ctx, local)
                log(step + 1, {"eval_loss": result.eval_loss})
                progress.note(f"step {step + 1}: eval loss {result.eval_loss:.3f} (unigram entropy {data.unigram_entropy:.3f})")
            if check_stop and ctx.broadcast(stop.received) is not None:
                read_back(step + 1, False)
                result.stopped_by_signal = True
                break
            if ckpt_now:
                save(step + 1)
            if stop_after is not None and step + 1 >= stop_after:
                break
    read_back(result.step, False)
    finished = result.step == steps
    if finished and t.eval_batches:
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
        scored = (f"eval loss {result.eval_loss:.3f} nats/token (unigram entropy of the corpus {data.unigram_entropy:.3f})"
                  if t.eval_batches else "no evaluation (train.eval_batches=0)")
        say(f"{scored}; checkpoint {result.checkpoint}")
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
    pp = (f"pp={p.pp} ({p.pp_schedule}, {p.pp_num_stages} stages, {p.pp_microbatches_resolved} microbatches) "
          if p.pp > 1 else "")
    return pp + f"dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} tp={p.tp} sp={p.sp} ep={p.ep}"


def _to_device(batch: Batch, device: torch.device) -> Batch:
    """A copy from pageable memory waits for the GPU to drain; from pinned memory it is queued."""
    if device.type != "cuda":
        return batch
    pin = [None if x is None else x.pin_memory() for x in (batch.input_ids, batch.labels, batch.cu_seqlens)]
    return Batch(*pin).to(device)


def _expert_load(model, ctx: Distributed) -> torch.Tensor:
    """Tokens per expert of every MoE layer in the last step, ``[moe layers, E]``; under pipeline
    parallelism gathered from the pp ranks (each holds its stages' layers) in layer order."""
    if not isinstance(model, PipelineModel):
        return collect_expert_load(model)
    mine = {int(i): collect_expert_load(block) for i, block in model.layers.items()}
    parts = [None] * dist.get_world_size(ctx.mesh.group("pp"))
    dist.all_gather_object(parts, {i: load for i, load in mine.items() if load.numel()}, group=ctx.mesh.group("pp"))
    rows = [load for _, load in sorted(((i, load) for part in parts for i, load in part.items()), key=lambda kv: kv[0])]
    return torch.cat(rows) if rows else torch.zeros(0, 0)


def _aux_names(job: JobConfig) -> set[str]:
    """The aux losses the model reports (the others are logged only when non-zero)."""
    names = {"moe_balance_loss"} if "E" in job.model.resolved_ffn_pattern() else set()
    if names and job.model.moe.z_loss_coef:
        names.add("moe_z_loss")
    return names


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
    pipeline = isinstance(model, PipelineModel)
    for batch in batches:
        batch = local(batch).to(device)
        with amp:
            if pipeline:
                total += model.eval_step(batch.input_ids, batch.labels)[0].item()
            else:
                total += model(batch.input_ids, labels=batch.labels, return_logits=False).lm_loss.item()
    model.train()
    mean = total / max(1, len(batches))
    return ctx.mean(mean, contributes=model.has_last if pipeline else True) if ctx is not None else mean
