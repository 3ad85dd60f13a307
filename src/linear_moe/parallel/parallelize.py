"""``parallelize_model``: every parallelism applied to a built model, in torchtitan's order.

    sequence parallel (LASP-2) -> tensor parallel -> expert parallel -> activation checkpointing -> FSDP2

LASP-2 wraps the token mixers before tensor parallelism so that the tp region encloses it: inside,
the mixer sees its sp rank's whole time slice (gathered over tp under ``tp_sequence_parallel``) and
the full-width input whose gradient the region sums over tp (RWKV6's token shift reads it).

Pipeline parallelism comes first: `parallelize_pipeline` cuts the stack into stages
(`pipeline.split_model`), parallelises each stage with `parallelize_model` and returns this rank's
`PipelineModel` with its schedule. Each step is a no-op when its size is 1.
"""
from __future__ import annotations

import torch
from torch import nn

from .activation_checkpoint import apply_activation_checkpointing
from .config import ParallelConfig, ParallelOptions
from .expert import apply_expert_parallel
from .fsdp import apply_fsdp
from .lasp2 import apply_sequence_parallel, shard_sequence
from .mesh import ParallelMesh
from .pipeline import PipelineModel, split_model
from .tensor import apply_tensor_parallel


def parallelize_model(model: nn.Module, parallel_cfg: ParallelConfig, mesh: ParallelMesh, *,
                      options: ParallelOptions | None = None, activation_checkpointing: str = "none") -> nn.Module:
    """Apply sp (LASP-2), tp, ep, activation checkpointing and FSDP to ``model`` (in place; returned).
    Tensor parallelism splits the vocabulary and the sequence as ``parallel_cfg.tp_vocab_parallel`` /
    ``tp_sequence_parallel`` say.

    ``mesh`` comes from ``build_mesh(parallel_cfg, ...)``; every rank must hold the same weights
    when this is called. Afterwards each rank feeds its own batch slice (`local_batch`).
    """
    options = options or ParallelOptions()
    for name in ("dp_replicate", "tp", "pp", "sp", "ep"):
        if getattr(parallel_cfg, name) != getattr(mesh.cfg, name):
            raise ValueError(f"parallel.{name}={getattr(parallel_cfg, name)} differs from the mesh's "
                             f"{getattr(mesh.cfg, name)}; build the mesh from the same ParallelConfig")
    model.sequence_parallel = apply_sequence_parallel(model, mesh.group("sp"), options.sp_layout)
    apply_tensor_parallel(model, mesh.submesh("tp"), vocab_parallel=parallel_cfg.tp_vocab_parallel,
                          sequence_parallel=parallel_cfg.tp_sequence_parallel)
    apply_expert_parallel(model, mesh)
    apply_activation_checkpointing(model, activation_checkpointing)
    apply_fsdp(model, mesh, options)
    return model


def parallelize_pipeline(model: nn.Module, parallel_cfg: ParallelConfig, mesh: ParallelMesh, device: torch.device, *,
                         options: ParallelOptions | None = None, activation_checkpointing: str = "none") -> PipelineModel:
    """Split ``model`` into pipeline stages (``parallel_cfg.pp_schedule``, ``pp_stages_per_rank``), keep
    this rank's, apply tp / ep / sp / activation checkpointing / FSDP to each, and build the schedule.
    Step the result with ``train_step(input_ids, labels)`` (every pp rank calls it with its data-parallel
    batch ``[batch, time]``; batch must divide into ``pp_microbatches``)."""
    modules, stage_ids, num_stages = split_model(model, mesh)
    for module in modules:
        parallelize_model(module, parallel_cfg, mesh, options=options, activation_checkpointing=activation_checkpointing)
    return PipelineModel(model, modules, stage_ids, num_stages).attach_schedule(mesh, device)


def local_batch(batch: torch.Tensor, mesh: ParallelMesh, layout: str = "contiguous") -> torch.Tensor:
    """This rank's part of a global batch ``[batch, time]``: rows by data-parallel rank, then the time
    slice by sequence-parallel rank (tp and pp peers get the same). The batch must divide by dp_size
    and the time by sp (2 sp for zigzag)."""
    dp = mesh.dp_size
    if batch.shape[0] % dp:
        raise ValueError(f"global batch size {batch.shape[0]} must be divisible by the data-parallel size {dp}")
    rows = batch.chunk(dp, 0)[mesh.dp_rank]
    return shard_sequence(rows, mesh.sp_rank, mesh.cfg.sp, layout) if mesh.cfg.sp > 1 else rows


def local_cu_seqlens(model: nn.Module, cu_seqlens: torch.Tensor | None, total_len: int) -> torch.Tensor | None:
    """Packed documents (batch 1, global ``cu_seqlens`` over ``total_len`` tokens): tell the model's
    sequence-parallel handler about them and return the ``cu_seqlens`` to pass with this rank's slice
    (unchanged without sequence parallelism). Call once per batch, before the forward."""
    handler = getattr(model, "sequence_parallel", None)
    if handler is None:
        return cu_seqlens
    return handler.set_documents(cu_seqlens, total_len)
