"""One device mesh for every parallelism, built from `ParallelConfig` (torchtitan's ParallelDims).

The world's ranks are laid out as a 5-d grid, outermost first::

    pp × dp_replicate × dp_shard × sp × tp

so tensor-parallel peers are neighbours (fastest links), then sequence-parallel peers, then the
data-parallel ranks. Flattened views used by the other files:

* ``dp``        = dp_replicate × dp_shard: ranks that read different batches (data sharding);
* ``dp_shard_sp`` = dp_shard × sp: what FSDP shards parameters over (sp ranks hold the same weights);
* ``dp_sp``     = dp_replicate × dp_shard × sp: where the loss and gradients are averaged.

Expert parallelism reuses the data-parallel ranks: the ``dp_shard × sp`` ranks of the grid are split
into ``edp × ep`` (ep innermost), giving a second mesh over the same ranks::

    pp × dp_replicate × edp × ep × tp

Experts are split over ``ep``; each expert slice is data-parallel over ``dp_replicate × edp``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ParallelConfig

DIMS = ("pp", "dp_replicate", "dp_shard", "sp", "tp")
EXPERT_DIMS = ("pp", "dp_replicate", "edp", "ep", "tp")


def resolve_parallel_config(cfg: ParallelConfig, world_size: int, num_heads: int | None = None,
                            num_experts: int | None = None) -> ParallelConfig:
    """A copy of ``cfg`` with ``dp_shard=-1`` replaced by the rest of the world size, validated
    (ValueError naming the bad field otherwise)."""
    cfg.validate(world_size, num_heads, num_experts)
    fixed = cfg.dp_replicate * cfg.tp * cfg.pp * cfg.sp
    dp_shard = world_size // fixed if cfg.dp_shard == -1 else cfg.dp_shard
    return dataclasses.replace(cfg, dp_shard=dp_shard)


@dataclass
class ParallelMesh:
    """The resolved sizes and the meshes. ``mesh`` / ``expert_mesh`` are None in a single process."""

    cfg: ParallelConfig                # dp_shard resolved
    world_size: int
    mesh: DeviceMesh | None = None
    expert_mesh: DeviceMesh | None = None
    flat: dict[str, DeviceMesh] = dataclasses.field(default_factory=dict)  # dp, dp_shard_sp, dp_sp

    # ---- sizes and coordinates ------------------------------------------------------------------
    @property
    def dp_size(self) -> int:
        """How many different batches are read at once (dp_replicate × dp_shard)."""
        return self.cfg.dp_replicate * self.cfg.dp_shard

    def coordinate(self, dim: str) -> int:
        """This rank's index along ``dim`` (one of DIMS, ``dp``, ``edp``, ``ep``); 0 without a mesh."""
        if dim in EXPERT_DIMS and dim not in DIMS:
            return 0 if self.expert_mesh is None else self.expert_mesh.get_local_rank(dim)
        if self.mesh is None:
            return 0
        if dim == "dp":
            return self.coordinate("dp_replicate") * self.cfg.dp_shard + self.coordinate("dp_shard")
        return self.mesh.get_local_rank(dim)

    @property
    def dp_rank(self) -> int:
        """Which slice of the global batch this rank reads (same for the sp and tp peers)."""
        return self.coordinate("dp")

    @property
    def sp_rank(self) -> int:
        """Which slice of the sequence this rank holds."""
        return self.coordinate("sp")

    # ---- sub-meshes and groups --------------------------------------------------------------------
    def submesh(self, name: str) -> DeviceMesh | None:
        """A named (possibly flattened) sub-mesh, or None when the mesh is absent or the size is 1."""
        if self.mesh is None:
            return None
        if name in ("edp", "ep", "expert_dp"):
            sizes = {"edp": self._edp, "ep": self.cfg.ep, "expert_dp": self.cfg.dp_replicate * self._edp}
            if sizes[name] == 1:
                return None
            dims = ("dp_replicate", "edp") if name == "expert_dp" else (name,)
            return self.expert_mesh[dims] if len(dims) > 1 and self.cfg.dp_replicate > 1 else self.expert_mesh[dims[-1]]
        sizes = {"pp": self.cfg.pp, "dp_replicate": self.cfg.dp_replicate, "dp_shard": self.cfg.dp_shard,
                 "sp": self.cfg.sp, "tp": self.cfg.tp, "dp": self.dp_size,
                 "dp_shard_sp": self.cfg.dp_shard * self.cfg.sp, "dp_sp": self.dp_size * self.cfg.sp}
        if name not in sizes:
            raise ValueError(f"unknown mesh dim {name!r}; choose one of: {', '.join([*sizes, 'edp', 'ep', 'expert_dp'])}")
        if sizes[name] == 1:
            return None
        return self.flat[name] if name in self.flat else self.mesh[name]

    def group(self, name: str) -> dist.ProcessGroup | None:
        """The process group along one (flattened) dim, or None when its size is 1."""
        sub = self.submesh(name)
        if sub is None:
            return None
        return sub.get_group() if sub.ndim == 1 else sub._flatten().get_group()

    @property
    def _edp(self) -> int:
        return self.cfg.dp_shard * self.cfg.sp // self.cfg.ep


def build_mesh(cfg: ParallelConfig, world_size: int | None = None, device_type: str = "cpu", *,
               num_heads: int | None = None, num_experts: int | None = None) -> ParallelMesh:
    """Validate ``cfg`` against the world size (and the model's head / expert counts when given) and
    build the meshes. Call after ``dist.init_process_group``; without one (or with a world of 1)
    returns a mesh-less `ParallelMesh` for a single process."""
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    resolved = resolve_parallel_config(cfg, world_size, num_heads, num_experts)
    if world_size == 1:
        return ParallelMesh(resolved, 1)
    if not dist.is_initialized():
        raise ValueError(f"world_size={world_size} needs torch.distributed to be initialised first")
    shape = (resolved.pp, resolved.dp_replicate, resolved.dp_shard, resolved.sp, resolved.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=DIMS)
    # Flattened views (they create their process groups now, on every rank in the same order).
    flat = {"dp": mesh["dp_replicate", "dp_shard"]._flatten("dp"),
            "dp_shard_sp": mesh["dp_shard", "sp"]._flatten("dp_shard_sp"),
            "dp_sp": mesh["dp_replicate", "dp_shard", "sp"]._flatten("dp_sp")}
    edp = resolved.dp_shard * resolved.sp // resolved.ep
    grid = mesh.mesh.reshape(resolved.pp, resolved.dp_replicate, edp, resolved.ep, resolved.tp)
    expert_mesh = DeviceMesh(device_type, grid, mesh_dim_names=EXPERT_DIMS)
    return ParallelMesh(resolved, world_size, mesh, expert_mesh, flat)
