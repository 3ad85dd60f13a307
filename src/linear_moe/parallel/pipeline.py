"""Pipeline parallelism with ``torch.distributed.pipelining``: the block stack cut into stages.

`split_model` keeps, on each pp rank, the stage(s) it runs: a `StageModule` holds a contiguous run
of blocks (the first stage also the embeddings, the last the final norm and LM head), with the full
model's parameter names (``layers.<i>.…``). Each stage module is then parallelised like a model
(`parallelize_model`), and `build_schedule` wraps them in a schedule:

* ``1F1B`` / ``GPipe``: one stage per rank;
* ``Interleaved1F1B``: ``pp_stages_per_rank`` stages per rank, stage s on rank ``s % pp``.

`PipelineModel` is what the trainer holds on a pp rank: the rank's embeddings / blocks / norm / head
under the full model's names (so optimizer, clipping, checkpoints and MoE bias updates treat it like
the model; a DCP checkpoint loads into any other layout) plus the schedule, stepped by `train_step`.

MoE / MoM auxiliary losses ride along: every stage outputs ``(hidden, aux)`` where ``aux``
``[len(AUX_NAMES)]`` holds, per kind of aux loss, the running sum over the layers so far (scaled by
their coefficients). The loss (`PipelineLoss`) adds their sum to the LM loss, so its gradient flows
back through every stage's routers, and records LM loss and aux values apart for the log. The
schedule averages the gradients over microbatches (each microbatch's loss is a mean over its tokens).

The last stage outputs the final-normed hidden state, not logits: the loss applies the LM head
chunk by chunk (`ops.linear_cross_entropy`), or, under tensor parallelism, the stage's
``lm_loss_fn`` (vocab-parallel: no rank ever holds a token's full logits). The head's weight is
read in the loss, right after the stage's forward: FSDP's root unit (embeddings, norm, head) is
normally still unsharded then; the loss asks for it anyway (`FSDPModule.unshard`, a no-op then), as
the pipeline's shape inference reshards between forward and loss.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..ops.autograd import contiguous_grad
from ..ops.cross_entropy import linear_cross_entropy
from .mesh import ParallelMesh

SCHEDULES = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe, "Interleaved1F1B": ScheduleInterleaved1F1B}
# the aux losses a block can return (model/block.py), in the order of the aux vector sent between stages
AUX_NAMES = ("moe_balance_loss", "moe_z_loss", "mixer_aux_loss")


class StageModule(nn.Module):
    """``forward(input_ids)`` on the first stage, ``forward(hidden, aux)`` on the others; returns
    ``(hidden [batch, time, hidden] (final-normed on the last stage), aux [len(AUX_NAMES)])``.
    The last stage's `lm_loss` turns its output into the LM loss."""

    def __init__(self, model: nn.Module, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.config = model.config
        self.embed = model.embed if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.lm_loss_fn = None  # set by tensor parallelism (parallel/tensor.py), as on the model

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy (-100 ignored) of the LM head on the last stage's output
        ``[batch, time (/ tp under sequence parallelism), hidden]``, labels ``[batch, time]``."""
        if isinstance(self, FSDPModule):  # the head is read outside forward: make sure it is gathered
            self.unshard()
        if self.lm_loss_fn is not None:
            return self.lm_loss_fn(hidden, self.lm_head.weight, labels)
        return linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, labels.flatten())

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None):
        if self.embed is not None:
            x = self.embed(x)
            # Tied to the hidden state (with a zero gradient) so that it requires grad even in a
            # stage without MoE: the pipeline sends back a gradient for every output.
            aux = x.float().sum() * 0.0 + x.new_zeros(len(AUX_NAMES), dtype=torch.float32)
        else:
            x, aux = contiguous_grad(x), contiguous_grad(aux)  # gloo refuses to send stride-0 gradients
        for block in self.layers.values():
            x, _, block_aux = block(x)
            if block_aux:
                aux = aux + torch.stack([block_aux[n].float() if n in block_aux else aux.new_zeros(())
                                         for n in AUX_NAMES])
        if self.norm is not None:
            x = self.norm(x)
        # P2P buffers copy the first microbatch's strides, and gloo sends only contiguous tensors
        return x.contiguous(), aux.contiguous()


class PipelineLoss:
    """The last stage's loss for one microbatch: mean token cross-entropy (-100 ignored) + the aux
    losses. Keeps each microbatch's detached ``(lm_loss, aux)`` in ``records`` for the log."""

    def __init__(self, stage: StageModule | None):
        self.stage = stage
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, output: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        hidden, aux = output
        lm = self.stage.lm_loss(hidden, labels)
        self.records.append((lm.detach(), aux.detach().float()))
        return lm + aux.sum()


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


def split_model(model: nn.Module, mesh: ParallelMesh) -> tuple[list[StageModule], list[int], int]:
    """This pp rank's stage modules, their stage indices and the total number of stages (schedule
    and stages per rank from ``mesh.cfg``)."""
    cfg = mesh.cfg
    cfg.validate(mesh.world_size)
    if getattr(model.config, "tie_embeddings", False) and cfg.pp > 1:
        raise ValueError("pipeline parallelism (pp > 1) needs model.tie_embeddings=false: the embedding and the "
                         "LM head live on different stages")
    pp, rank, per_rank = cfg.pp, mesh.coordinate("pp"), cfg.pp_stages_per_rank_resolved
    num_stages = cfg.pp_num_stages
    runs = stage_layer_ids(len(model.layers), num_stages)
    ids = [rank + k * pp for k in range(per_rank)]
    modules = [StageModule(model, runs[s], s == 0, s == num_stages - 1) for s in ids]
    return modules, ids, num_stages


def build_schedule(modules: list[nn.Module], stage_ids: list[int], num_stages: int, mesh: ParallelMesh,
                   device: torch.device, loss_fn=None):
    """The schedule over this rank's (already parallelised) stage modules. Step it with
    ``schedule.step(input_ids)`` on the rank holding stage 0, ``schedule.step(target=labels,
    losses=out)`` on the one holding the last stage, ``schedule.step()`` elsewhere (a rank holding
    both passes both). ``input_ids`` is this data-parallel rank's batch; it is cut into
    ``pp_microbatches`` (default 2 pp) along the batch dim. ``loss_fn(output, labels)`` defaults to
    `PipelineLoss` of the last stage (when this rank holds it)."""
    if loss_fn is None:
        last = [m for m, i in zip(modules, stage_ids) if i == num_stages - 1]
        loss_fn = PipelineLoss(last[0] if last else None)  # every rank passes one: None means no backward
    group = mesh.group("pp")
    stages = [PipelineStage(m, i, num_stages, device, group=group) for m, i in zip(modules, stage_ids)]
    microbatches = mesh.cfg.pp_microbatches_resolved
    cls = SCHEDULES[mesh.cfg.pp_schedule]
    if cls is ScheduleInterleaved1F1B:
        return cls(stages, microbatches, loss_fn=loss_fn)
    return cls(stages[0], microbatches, loss_fn=loss_fn)


class PipelineModel(nn.Module):
    """This pp rank's part of the model, under the full model's parameter names (``embed`` on the
    first stage's rank, ``layers.<i>`` for its blocks, ``norm`` / ``lm_head`` on the last stage's),
    and the schedule that runs it. The stage modules share these submodules (not registered twice)."""

    def __init__(self, model: nn.Module, modules: list[StageModule], stage_ids: list[int], num_stages: int):
        super().__init__()
        self.config = model.config
        self.has_first, self.has_last = 0 in stage_ids, num_stages - 1 in stage_ids
        self.embed = model.embed if self.has_first else None
        self.layers = nn.ModuleDict({k: b for m in modules for k, b in m.layers.items()})
        self.norm = model.norm if self.has_last else None
        self.lm_head = model.lm_head if self.has_last else None
        self.stages, self.stage_ids, self.num_stages = list(modules), stage_ids, num_stages
        last = [m for m, i in zip(modules, stage_ids) if i == num_stages - 1]
        self.loss_fn = PipelineLoss(last[0] if last else None)
        self.schedule = None  # set by `attach_schedule`

    def attach_schedule(self, mesh: ParallelMesh, device: torch.device) -> "PipelineModel":
        self.schedule = build_schedule(self.stages, self.stage_ids, self.num_stages, mesh, device, self.loss_fn)
        self.microbatches = mesh.cfg.pp_microbatches_resolved
        return self

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline stage runs through its schedule: call train_step / eval_step")

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of this data-parallel rank's batch ``[batch, time]`` over all stages.
        Returns ``(lm_loss [], aux [len(AUX_NAMES)])`` averaged over microbatches on the rank holding
        the last stage, zeros elsewhere; device tensors (nothing is read back to the host)."""
        return self._run(self.schedule.step, input_ids, labels)

    @torch.no_grad()
    def eval_step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`train_step` without the backward pass."""
        return self._run(self.schedule.eval, input_ids, labels)

    def _run(self, run, input_ids, labels):
        self.loss_fn.records.clear()
        run(*((input_ids,) if self.has_first else ()), target=labels if self.has_last else None,
            losses=[] if self.has_last else None)
        if not self.has_last:
            return torch.zeros((), device=input_ids.device), torch.zeros(len(AUX_NAMES), device=input_ids.device)
        # The first step also calls the loss once on uninitialised buffers (the stage's shape inference,
        # before the microbatches): keep the microbatches' records only.
        records = self.loss_fn.records[-self.microbatches:]
        lm = torch.stack([r[0] for r in records]).mean()
        aux = torch.stack([r[1] for r in records]).mean(0)
        return lm, aux
