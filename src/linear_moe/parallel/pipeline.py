"""Pipeline parallelism with ``torch.distributed.pipelining``: the block stack cut into stages.

`split_model` keeps, on each pp rank, the stage(s) it runs: a `StageModule` holds a contiguous run
of blocks (the first stage also the embeddings, the last the final norm and LM head), with the full
model's parameter names (``layers.<i>.…``), so checkpoints are layout-free. Each stage module is then
parallelised like a model (`parallelize_model`), and `build_schedule` wraps them in a schedule:

* ``1F1B`` / ``GPipe``: one stage per rank;
* ``Interleaved1F1B``: ``pp_stages_per_rank`` stages per rank, stage s on rank ``s % pp``.

MoE / MoM auxiliary losses ride along: every stage outputs ``(hidden, aux)`` where ``aux`` ``[1]`` is
the running sum of the scaled aux losses, and the loss (`pipeline_loss`) adds it to the LM loss, so
its gradient flows back through every stage's routers. The schedule averages the gradients over
microbatches (each microbatch's loss is a mean over its tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from .config import ParallelOptions
from .mesh import ParallelMesh

SCHEDULES = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe, "Interleaved1F1B": ScheduleInterleaved1F1B}


class StageModule(nn.Module):
    """``forward(input_ids)`` on the first stage, ``forward(hidden, aux)`` on the others; returns
    ``(hidden [batch, time, hidden] or logits [batch, time, vocab] on the last stage, aux [1])``."""

    def __init__(self, model: nn.Module, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.embed = model.embed if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None):
        if self.embed is not None:
            x = self.embed(x)
            # Tied to the hidden state (with a zero gradient) so that it requires grad even in a
            # stage without MoE: the pipeline sends back a gradient for every output.
            aux = (x.float().sum() * 0.0).reshape(1)
        for block in self.layers.values():
            x, _, block_aux = block(x)
            for value in block_aux.values():
                aux = aux + value
        if self.lm_head is not None:
            x = self.lm_head(self.norm(x))
        return x, aux


def pipeline_loss(output: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """The last stage's loss for one microbatch: mean token cross-entropy (-100 ignored) + aux losses."""
    logits, aux = output
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100) + aux.sum()


def stage_layer_ids(num_layers: int, num_stages: int) -> list[list[int]]:
    """Contiguous, as even as possible runs of layers (earlier stages get the extra ones)."""
    if num_stages > num_layers:
        raise ValueError(f"pipeline: {num_stages} stages need at least as many layers, got num_layers={num_layers}")
    base, extra = divmod(num_layers, num_stages)
    out, start = [], 0
    for s in range(num_stages):
        size = base + (s < extra)
        out.append(list(range(start, start + size)))
        start += size
    return out


def split_model(model: nn.Module, mesh: ParallelMesh, options: ParallelOptions | None = None
                ) -> tuple[list[StageModule], list[int], int]:
    """This pp rank's stage modules, their stage indices and the total number of stages."""
    options = options or ParallelOptions()
    if options.pp_schedule not in SCHEDULES:
        raise ValueError(f"parallel option pp_schedule={options.pp_schedule!r} is not one of {', '.join(SCHEDULES)}")
    per_rank = options.pp_stages_per_rank
    if per_rank < 1 or (per_rank > 1) != (options.pp_schedule == "Interleaved1F1B"):
        raise ValueError(f"parallel option pp_stages_per_rank={per_rank}: use 1 with 1F1B / GPipe and >= 2 "
                         "with Interleaved1F1B")
    if getattr(model.config, "tie_embeddings", False) and mesh.cfg.pp > 1:
        raise ValueError("pipeline parallelism (pp > 1) needs model.tie_embeddings=false: the embedding and the "
                         "LM head live on different stages")
    pp, rank = mesh.cfg.pp, mesh.coordinate("pp")
    num_stages = pp * per_rank
    runs = stage_layer_ids(len(model.layers), num_stages)
    ids = [rank + k * pp for k in range(per_rank)]
    modules = [StageModule(model, runs[s], s == 0, s == num_stages - 1) for s in ids]
    return modules, ids, num_stages


def build_schedule(modules: list[nn.Module], stage_ids: list[int], num_stages: int, mesh: ParallelMesh,
                   device: torch.device, options: ParallelOptions | None = None, loss_fn=pipeline_loss):
    """The schedule over this rank's (already parallelised) stage modules. Step it with
    ``schedule.step(input_ids)`` on the rank holding stage 0, ``schedule.step(target=labels,
    losses=out)`` on the one holding the last stage, ``schedule.step()`` elsewhere (a rank holding
    both passes both). ``input_ids`` is this data-parallel rank's batch; it is cut into
    ``pp_microbatches`` (default 2 pp) along the batch dim."""
    options = options or ParallelOptions()
    group = mesh.group("pp")
    stages = [PipelineStage(m, i, num_stages, device, group=group) for m, i in zip(modules, stage_ids)]
    microbatches = options.pp_microbatches or 2 * mesh.cfg.pp
    cls = SCHEDULES[options.pp_schedule]
    if cls is ScheduleInterleaved1F1B:
        return cls(stages, microbatches, loss_fn=loss_fn)
    return cls(stages[0], microbatches, loss_fn=loss_fn)
