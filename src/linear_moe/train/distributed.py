"""What the trainer needs to run under ``torchrun``: the process group, the device mesh, the checks on
a layout that only the trainer knows about (batch, packing, pipeline microbatches), and the few
collectives a training loop does itself (averaging logged numbers, agreeing on a run directory).

With ``WORLD_SIZE`` unset or 1 everything here is a no-op, and the trainer is the single-process one.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import ConfigError, JobConfig
from ..parallel.mesh import ParallelMesh, build_mesh


@dataclass
class Distributed:
    mesh: ParallelMesh
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float, contributes: bool = True) -> float:
        """Average a per-rank scalar over the ranks that ``contribute`` (under pipeline parallelism
        only those holding the last stage have a loss). tp peers hold the same value, so the mean
        over all contributing ranks is the mean over the data × sequence-parallel ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value if contributes else 0.0, float(contributes)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        total, count = t.tolist()
        return total / count

    def broadcast(self, obj):
        """Rank 0's value of ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


@dataclass
class StepLog:
    """Each step's numbers kept on the device (no host sync in the step) and read back together at a
    logging step: one all-reduce averages loss and aux losses over the ranks that hold them (see
    `Distributed.mean`), one copy brings everything to the host. The gradient norm and the
    finite-ness flag are already the same on every rank (the norm is reduced over all meshes)."""

    ctx: Distributed
    aux_names: tuple[str, ...]
    contributes: bool = True            # False on pp ranks without the last stage
    _pending: list = field(default_factory=list)

    def add(self, step: int, lr: float, loss: torch.Tensor, aux: torch.Tensor, grad_norm: torch.Tensor,
            finite: torch.Tensor) -> None:
        """``loss`` [] and ``aux`` [len(aux_names)]: this rank's means over its tokens; device tensors."""
        self._pending.append((step, lr, loss, aux, grad_norm, finite))

    def __len__(self) -> int:
        return len(self._pending)

    def flush(self) -> list[dict]:
        """``[{"step", "lr", "loss", "aux": {name: value}, "grad_norm", "finite"}]`` for the steps since
        the last flush, the same on every rank. A collective: every rank calls it at the same steps."""
        if not self._pending:
            return []
        c = float(self.contributes)
        local = torch.stack([torch.cat([loss.detach().reshape(1).double() * c, aux.detach().reshape(-1).double() * c,
                                        loss.new_full((1,), c, dtype=torch.float64)])
                             for _, _, loss, aux, _, _ in self._pending])
        if self.ctx.enabled:
            dist.all_reduce(local)
        means = local[:, :-1] / local[:, -1:]
        same = torch.stack([torch.stack([g.detach().double().reshape(()), f.double().reshape(())])
                            for *_, g, f in self._pending]).to(means.device)
        host = torch.cat([means, same], 1).tolist()  # the one host read of the interval
        rows = []
        for (step, lr, *_), values in zip(self._pending, host):
            rows.append({"step": step, "lr": lr, "loss": values[0], "aux": dict(zip(self.aux_names, values[1:-2])),
                         "grad_norm": values[-2], "finite": bool(values[-1])})
        self._pending.clear()
        return rows


def check_layout(job: JobConfig) -> None:
    """What `ParallelConfig.validate` cannot see: the training batch, packing and the layer count
    against the pipeline layout. ConfigError naming the field otherwise."""
    p, t = job.parallel, job.train
    if t.seq_len % p.sp:
        raise ConfigError(f"train.seq_len={t.seq_len} must be divisible by parallel.sp={p.sp}")
    if p.tp > 1 and p.tp_sequence_parallel and (t.seq_len // p.sp) % p.tp:
        raise ConfigError(f"parallel.tp_sequence_parallel shards each rank's {t.seq_len // p.sp} tokens "
                          f"(train.seq_len={t.seq_len} / parallel.sp={p.sp}) over parallel.tp={p.tp}: they must divide")
    if p.pp == 1:
        return
    stages, micro = p.pp_num_stages, p.pp_microbatches_resolved
    if job.data.packing:
        raise ConfigError("parallel.pp > 1 does not support data.packing=true (packed batches have one row of "
                          "documents; microbatches split rows): set data.packing=false or parallel.pp=1")
    if t.grad_accum != 1:
        raise ConfigError(f"train.grad_accum={t.grad_accum} with parallel.pp={p.pp}: the pipeline's microbatches are "
                          "the accumulation; set train.grad_accum=1 and raise parallel.pp_microbatches / train.batch_size")
    if job.model.tie_embeddings:
        raise ConfigError("parallel.pp > 1 needs model.tie_embeddings=false (embedding and LM head live on different stages)")
    if job.model.num_layers % stages:
        raise ConfigError(f"model.num_layers={job.model.num_layers} must be divisible by the {stages} pipeline stages "
                          f"(parallel.pp={p.pp} × pp_stages_per_rank={p.pp_stages_per_rank_resolved})")
    if t.batch_size % micro:
        raise ConfigError(f"train.batch_size={t.batch_size} (per data-parallel rank) must be divisible by "
                          f"parallel.pp_microbatches={micro}")


def init_distributed(job: JobConfig, device: torch.device) -> Distributed:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU) and build the mesh."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    p = job.parallel
    if world == 1 and not (dist.is_available() and dist.is_initialized()):
        mesh = build_mesh(p, 1, num_heads=job.model.attention.num_heads, num_experts=job.model.moe.num_experts)
        return Distributed(mesh)
    check_layout(job)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    world = dist.get_world_size()
    try:
        mesh = build_mesh(p, world, device_type=device.type, num_heads=job.model.attention.num_heads,
                          num_experts=job.model.moe.num_experts)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Distributed(mesh, dist.get_rank(), world, device)
