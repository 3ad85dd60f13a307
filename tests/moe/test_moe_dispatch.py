"""Expert parallelism over 2 and 4 gloo processes equals the single-process layer: outputs, expert
gradients (summed over the ep group's tokens), router and shared-expert gradients (per rank)."""
import copy
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from linear_moe.moe import MoEConfig, MoELayer

C = 16
EP_CASES = {
    "shared_gate_dropless": MoEConfig(num_experts=8, top_k=2, expert_hidden_size=8, num_shared_experts=1,
                                      shared_expert_gate=True, norm_topk_prob=False, z_loss_coef=0.01),
    "deepseek_capacity": MoEConfig(num_experts=8, top_k=3, expert_hidden_size=8, router="deepseek", n_group=4,
                                   topk_group=2, routed_scaling_factor=2.0, num_shared_experts=2, capacity_factor=0.6),
    "sigmoid_bias": MoEConfig(num_experts=8, top_k=2, expert_hidden_size=8, router="sigmoid_bias", bias_update_rate=0.05),
    # with a large bias on experts 0 and 1 every token goes to rank 0: the other ranks receive no rows
    "all_to_rank0": MoEConfig(num_experts=8, top_k=2, expert_hidden_size=8, router="sigmoid_bias", bias_update_rate=0.05),
}
SKEWED = {"all_to_rank0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss(y, aux, g):
    return (y * g).sum() + aux.loss


def _worker(rank: int, world: int, port: int, cases: list[tuple[MoEConfig, bool]], seed: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        for i, (cfg, skewed) in enumerate(cases):
            _check_case(rank, world, cfg, skewed, seed + i)
    finally:
        dist.destroy_process_group()


def _check_case(rank: int, world: int, cfg: MoEConfig, skewed: bool, seed: int) -> None:
    """One configuration on this rank: the ep layer against the full layer on each rank's tokens."""
    torch.manual_seed(seed)  # every rank builds the same full layer and sees everyone's inputs
    full = MoELayer(C, cfg).train()
    if skewed:
        full.router.expert_bias[:2] = 10.0
    bias_before = None if full.router.expert_bias is None else full.router.expert_bias.clone()
    xs = [torch.randn(2, 5, C) for _ in range(world)]
    gs = [torch.randn(2, 5, C) for _ in range(world)]
    xs[0][0] = xs[0][1]  # some repeated tokens: uneven loads
    ep = copy.deepcopy(full).enable_expert_parallel(None)
    n = cfg.num_experts // world
    assert ep.experts.gate_proj.shape[0] == n

    y, aux = ep(xs[rank])
    _loss(y, aux, gs[rank]).backward()

    expert_want = {k: torch.zeros_like(v) for k, v in full.experts.named_parameters()}
    for r in range(world):
        full.zero_grad(set_to_none=True)
        ry, raux = full(xs[r])
        _loss(ry, raux, gs[r]).backward()
        for k, v in full.experts.named_parameters():
            expert_want[k] += v.grad
        if r == rank:
            torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(aux.loss, raux.loss)
            torch.testing.assert_close(aux.tokens_per_expert, raux.tokens_per_expert)
            torch.testing.assert_close(aux.dropped_fraction, raux.dropped_fraction)
            for k, v in full.named_parameters():
                if not k.startswith("experts."):
                    torch.testing.assert_close(dict(ep.named_parameters())[k].grad, v.grad, rtol=1e-5, atol=1e-6)
    for k, v in ep.experts.named_parameters():
        torch.testing.assert_close(v.grad, expert_want[k][rank * n:(rank + 1) * n], rtol=1e-5, atol=1e-6)
        if skewed:  # rank 0 holds experts 0 and 1 and did all the work; the others got empty batches
            assert (v.grad.abs().sum() > 0) == (rank == 0)

    if cfg.router == "sigmoid_bias":  # the group all-reduce gives every rank the bias of the global load
        ep.update_bias(dist.group.WORLD)
        gathered = [torch.zeros(cfg.num_experts) for _ in range(world)]
        dist.all_gather(gathered, ep.router.expert_bias)
        assert all(torch.equal(b, gathered[0]) for b in gathered)
        load = sum(torch.bincount(full.router(x.reshape(-1, C)).topk_idx.reshape(-1), minlength=cfg.num_experts).float()
                   for x in xs)
        torch.testing.assert_close(ep.router.expert_bias - bias_before, cfg.bias_update_rate * torch.sign(load.mean() - load))


def _spawn(world: int, cases: list[tuple[MoEConfig, bool]], timeout_s: float = 150.0) -> None:
    ctx = mp.start_processes(_worker, args=(world, _free_port(), cases, int(torch.randint(0, 2**30, ()))),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"expert-parallel workers did not finish within {timeout_s}s")


# One spawn per world size (starting processes dominates the cost), several configurations each.
@pytest.mark.parametrize("world, cases", [(2, ["shared_gate_dropless", "sigmoid_bias"]), (4, ["deepseek_capacity", "all_to_rank0"])])
def test_expert_parallel_matches_single_process(world, cases):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    _spawn(world, [(EP_CASES[c], c in SKEWED) for c in cases])


def test_enable_expert_parallel_rejects_uneven_split(monkeypatch):
    layer = MoELayer(C, MoEConfig(num_experts=6, top_k=2, expert_hidden_size=8))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the expert-parallel size 4"):
        layer.enable_expert_parallel(None)


@pytest.mark.parametrize("num_experts,key_dtype", [(64, torch.uint8), (256, torch.uint8), (300, torch.int16),
                                                   (70000, torch.int32)])
def test_sort_by_expert_sorts_on_the_narrowest_key_and_keeps_token_order(num_experts, key_dtype):
    """The radix sort's key is the narrowest integer type holding every expert id (one pass per key byte on the
    GPU); the order is the stable int64 sort's: token order within each expert, the highest ids included."""
    from linear_moe.moe.dispatch import _narrow_keys, sort_by_expert

    gen = torch.Generator().manual_seed(num_experts)
    idx = torch.randint(0, num_experts, (500, 4), generator=gen)
    idx[0, 0], idx[1, 1] = num_experts - 1, num_experts - 1
    assert _narrow_keys(idx.reshape(-1), num_experts).dtype == key_dtype
    order, counts, _ = sort_by_expert(idx, num_experts)
    assert torch.equal(order, torch.argsort(idx.reshape(-1), stable=True))
    assert torch.equal(counts, torch.bincount(idx.reshape(-1), minlength=num_experts))
