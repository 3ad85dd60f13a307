"""What the trainer needs to run under ``torchrun``: the process group, the device mesh, and the
few collectives a training loop does itself (loss averaging for the log, agreeing on a run directory).

With ``WORLD_SIZE`` unset or 1 everything here is a no-op, and the trainer is the single-process one.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

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

    def mean(self, value: float) -> float:
        """Average a per-rank scalar over the ranks that read different tokens (data × sequence parallel)."""
        group = self.mesh.group("dp_sp") if self.enabled else None
        if group is None:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=group)
        return float(t.item()) / dist.get_world_size(group)

    def broadcast(self, obj):
        """Rank 0's value of ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(job: JobConfig, device: torch.device) -> Distributed:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU) and build the mesh."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    p = job.parallel
    if world == 1 and not (dist.is_available() and dist.is_initialized()):
        mesh = build_mesh(p, 1, num_heads=job.model.attention.num_heads, num_experts=job.model.moe.num_experts)
        return Distributed(mesh)
    if p.pp > 1:
        raise ConfigError(f"parallel.pp={p.pp}: the trainer does not drive pipeline schedules yet "
                          "(linear_moe.parallel.pipeline works from Python); use dp/tp/sp/ep")
    if job.train.seq_len % p.sp:
        raise ConfigError(f"train.seq_len={job.train.seq_len} must be divisible by parallel.sp={p.sp}")
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
