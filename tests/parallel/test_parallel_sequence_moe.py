"""The MoE balance loss under sequence parallelism (parallel/sequence_moe.py): each sp rank holds a time
slice of every sequence; the all-reduced loss equals the one-process loss over whole sequences (per
sequence too, DeepSeek's ``seq_aux_loss``). The all-reduce's backward sums every rank's copy, so each
rank's gradient of its probabilities is sp × the one-process one: what averaging the gradients over the
sp ranks (FSDP, as for the LM loss, a mean of per-rank means) turns back into it (float64, 2 gloo
processes)."""
from __future__ import annotations

import torch

from linear_moe.moe.router import load_balancing_loss
from linear_moe.parallel.sequence_moe import sequence_balance_loss
from parallel_testing import rel_err, run_distributed

B, T, E, K = 3, 8, 5, 2


def _worker(rank, world, probs, idx):
    import torch.distributed as dist

    out = {}
    for per_sequence in (False, True):
        mine = probs.chunk(world, 1)[rank].clone().requires_grad_(True)  # [B, T / sp, E]
        chosen = idx.chunk(world, 1)[rank]
        loss = sequence_balance_loss(mine.flatten(0, 1), chosen.flatten(0, 1), E, B if per_sequence else 1,
                                     dist.group.WORLD, world)
        loss.backward()
        out[per_sequence] = (loss.detach(), mine.grad)
    return out


def test_balance_loss_over_sp_ranks_equals_one_process():
    gen = torch.Generator().manual_seed(torch.seed())
    probs = torch.randn(B, T, E, generator=gen, dtype=torch.float64).softmax(-1)
    idx = probs.topk(K, -1).indices
    results = run_distributed(_worker, 2, probs, idx, timeout=120)
    for per_sequence in (False, True):
        ref_probs = probs.clone().requires_grad_(True)
        ref = load_balancing_loss(ref_probs.flatten(0, 1), idx.flatten(0, 1), E, T if per_sequence else None)
        ref.backward()
        for rank, out in enumerate(results):
            loss, grad = out[per_sequence]
            assert rel_err(loss, ref) < 1e-12, (per_sequence, rank, loss, ref)
            assert rel_err(grad, 2 * ref_probs.grad.chunk(2, 1)[rank]) < 1e-12, (per_sequence, rank)
