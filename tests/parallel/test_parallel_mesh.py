"""Mesh sizes and validation (single process) and batch slicing helpers (the coordinates on 4 ranks
are checked in test_parallel_checkpoint.py, whose job already spawns them)."""
from __future__ import annotations

import pytest
import torch

from linear_moe.parallel.config import ParallelConfig
from linear_moe.parallel.lasp2 import shard_sequence
from linear_moe.parallel.mesh import build_mesh, resolve_parallel_config
from linear_moe.parallel.parallelize import local_batch


def test_dp_shard_takes_the_rest_of_the_world():
    cfg = resolve_parallel_config(ParallelConfig(tp=2, sp=2), 16)
    assert (cfg.dp_shard, cfg.tp, cfg.sp, cfg.dp_replicate, cfg.pp) == (4, 2, 2, 1, 1)


@pytest.mark.parametrize("kwargs, world, match", [
    (dict(tp=0), 4, r"parallel\.tp=0 must be >= 1"),
    (dict(dp_shard=0), 4, r"parallel\.dp_shard=0"),
    (dict(tp=3), 4, r"do not divide the world size 4"),
    (dict(tp=2, dp_shard=4), 4, r"multiply to 8 .* world size is 4"),
    (dict(ep=3), 3, r"parallel\.ep=3 must divide the number of experts 4"),
    (dict(tp=2, ep=4), 4, r"parallel\.ep=4 must divide the data-parallel ranks dp\*sp=2"),
])
def test_bad_layouts_raise_naming_the_field(kwargs, world, match):
    with pytest.raises(ValueError, match=match):
        build_mesh(ParallelConfig(**kwargs), world, num_heads=4, num_experts=4)


def test_heads_must_divide_by_tp():
    with pytest.raises(ValueError, match=r"parallel\.tp=4 must divide the number of heads 6"):
        resolve_parallel_config(ParallelConfig(tp=4), 4, num_heads=6)


def test_single_process_mesh_is_trivial():
    mesh = build_mesh(ParallelConfig(), 1)
    assert mesh.mesh is None and mesh.dp_size == 1 and mesh.dp_rank == 0 and mesh.group("tp") is None
    batch = torch.arange(12).view(2, 6)
    assert torch.equal(local_batch(batch, mesh), batch)


def test_shard_sequence_layouts_cover_the_sequence():
    x = torch.arange(16).view(1, 16)
    contiguous = [shard_sequence(x, r, 4) for r in range(4)]
    assert torch.equal(torch.cat(contiguous, 1), x)
    zigzag = [shard_sequence(x, r, 2, "zigzag") for r in range(2)]
    assert zigzag[0].tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]] and zigzag[1].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    with pytest.raises(ValueError, match="divisible by 8"):
        shard_sequence(torch.zeros(1, 12), 0, 4, "zigzag")
    with pytest.raises(ValueError, match="layout='ring'"):
        shard_sequence(x, 0, 2, "ring")


def test_vocab_parallel_needs_tp_to_divide_the_vocabulary():
    with pytest.raises(ValueError, match=r"parallel\.tp=2 must divide model\.vocab_size=65 .*tp_vocab_parallel=false"):
        ParallelConfig(tp=2).validate(2, vocab_size=65)
    ParallelConfig(tp=2, tp_vocab_parallel=False).validate(2, vocab_size=65)
    ParallelConfig(tp=1).validate(1, vocab_size=65)
