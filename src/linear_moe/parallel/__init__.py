"""Parallelism applied from outside to a built model (torchtitan style), one file per kind.

* `mesh.build_mesh(cfg, world_size)` -> `ParallelMesh`: pp × dp_replicate × dp_shard × sp × tp, plus the expert mesh;
* `parallelize.parallelize_model(model, cfg, mesh)`: sp (LASP-2) -> tp -> ep -> activation checkpointing -> FSDP2;
  tensor parallelism splits the heads, and, as ``cfg.tp_vocab_parallel`` (default on: embedding, LM head and
  loss split by vocabulary) and ``cfg.tp_sequence_parallel`` (default off: norms and residual stream split over
  time; no generation with it) say, the vocabulary and the sequence (``--parallel.tp_vocab_parallel false`` on
  the command line);
* `parallelize.parallelize_pipeline(model, cfg, mesh, device)` -> `PipelineModel`: the stages of this pp rank,
  each parallelised as above, and their schedule (`train_step` / `eval_step`);
  `pipeline.split_model` / `pipeline.build_schedule` are its two halves;
* `fsdp.clip_grad_norm_(model, max_norm, mesh)`: the global gradient norm across all meshes;
* `parallelize.local_batch(batch, mesh)`: this rank's rows (dp) and time slice (sp);
  `parallelize.local_cu_seqlens(model, cu_seqlens, total_len)`: the same for packed documents.

Under sequence parallelism (sp > 1) each MoE layer's balance loss covers the whole sequence
(`sequence_moe.py`), as in one process.
"""
from .config import ParallelConfig, ParallelOptions
from .fsdp import clip_grad_norm_
from .mesh import ParallelMesh, build_mesh
from .parallelize import local_batch, local_cu_seqlens, parallelize_model, parallelize_pipeline
from .pipeline import PipelineModel, build_schedule, split_model

__all__ = ["ParallelConfig", "ParallelMesh", "ParallelOptions", "PipelineModel", "build_mesh", "build_schedule",
           "clip_grad_norm_", "local_batch", "local_cu_seqlens", "parallelize_model", "parallelize_pipeline",
           "split_model"]
