"""Parallelism applied from outside to a built model (torchtitan style), one file per kind.

* `mesh.build_mesh(cfg, world_size)` -> `ParallelMesh`: pp × dp_replicate × dp_shard × sp × tp, plus the expert mesh;
* `parallelize.parallelize_model(model, cfg, mesh)`: tp -> ep -> sp (LASP-2) -> activation checkpointing -> FSDP2;
* `pipeline.split_model` / `pipeline.build_schedule`: pipeline stages and their 1F1B / interleaved schedule;
* `fsdp.clip_grad_norm_(model, max_norm, mesh)`: the global gradient norm across all meshes;
* `parallelize.local_batch(batch, mesh)`: this rank's rows (dp) and time slice (sp);
  `parallelize.local_cu_seqlens(model, cu_seqlens, total_len)`: the same for packed documents.
"""
from .config import ParallelConfig, ParallelOptions
from .fsdp import clip_grad_norm_
from .mesh import ParallelMesh, build_mesh
from .parallelize import local_batch, local_cu_seqlens, parallelize_model
from .pipeline import build_schedule, split_model

__all__ = ["ParallelConfig", "ParallelMesh", "ParallelOptions", "build_mesh", "build_schedule", "clip_grad_norm_",
           "local_batch", "local_cu_seqlens", "parallelize_model", "split_model"]
