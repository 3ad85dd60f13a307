"""Pipeline parallelism (1F1B, interleaved 1F1B) alone and with FSDP: loss (MoE aux losses included)
and gradients of one step equal the single-process run over the same microbatches, and a few AdamW
steps track the single-process loss curve."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.distributed.tensor import DTensor

from linear_moe.model.causal_lm import LinearMoEForCausalLM
from linear_moe.parallel.config import ParallelConfig
from linear_moe.parallel.fsdp import clip_grad_norm_
from linear_moe.parallel.mesh import build_mesh
from linear_moe.parallel.parallelize import local_batch, parallelize_model
from linear_moe.parallel.pipeline import build_schedule, split_model, stage_layer_ids
from parallel_testing import rel_err, run_distributed
from test_parallel_model import BATCH, LR, STEPS, T, VOCAB, model_config, reference


def _pp_worker(rank, world, cfg, pcfg, state, ids, labels, clip):
    mesh = build_mesh(pcfg, world)
    model = LinearMoEForCausalLM(cfg)
    model.load_state_dict(state)
    modules, stage_ids, num_stages = split_model(model, mesh)
    for module in modules:
        parallelize_model(module, pcfg, mesh)
    schedule = build_schedule(modules, stage_ids, num_stages, mesh, torch.device("cpu"))
    opt = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=LR)
    my_ids, my_labels = local_batch(ids, mesh), local_batch(labels, mesh)
    first, last = 0 in stage_ids, num_stages - 1 in stage_ids
    losses, grads, norm = [], {}, None
    for step in range(STEPS):
        mb_losses = [] if last else None
        schedule.step(*((my_ids,) if first else ()), target=my_labels if last else None, losses=mb_losses)
        if step == 0:
            for m in modules:
                for n, p in m.named_parameters():
                    g = p.grad
                    grads[n] = (g.full_tensor() if isinstance(g, DTensor) else g).clone()
            norm = clip_grad_norm_(modules, clip, mesh).item()
        opt.step()
        opt.zero_grad()
        if last:
            losses.append(torch.stack([loss.detach() for loss in mb_losses]).mean().item())
    return losses, grads, norm, last


CASES = {
    # id: (ParallelConfig, world, layers)
    "pp2-1F1B": (ParallelConfig(pp=2), 2, 2),
    "pp2xdp2-1F1B": (ParallelConfig(pp=2, pp_microbatches=2), 4, 2),
    "pp2-interleaved": (ParallelConfig(pp=2, pp_schedule="Interleaved1F1B", pp_stages_per_rank=2, pp_microbatches=4), 2, 4),
    # stage modules without embedding / head under tp; vocab-parallel loss on the last stage, sequence-split hidden
    # states sent between stages
    "pp2xtp2-seq": (ParallelConfig(pp=2, tp=2, tp_sequence_parallel=True), 4, 2),
}


def _jobs_worker(rank, world, jobs):
    return [_pp_worker(rank, world, *job) for job in jobs]


def _prepare(pcfg, world, layers):
    cfg = dataclasses.replace(model_config("gla", "LN" * (layers // 2)), num_layers=layers, ffn_pattern="DE" * (layers // 2))
    gen = torch.Generator().manual_seed(torch.seed())
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    state = LinearMoEForCausalLM(cfg).state_dict()
    ids = torch.randint(0, VOCAB, (BATCH, T), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, T), generator=gen)
    dp = world // (pcfg.pp * pcfg.tp)
    microbatches = pcfg.pp_microbatches_resolved
    clip = 0.05
    # the single-process loss: mean over every (data-parallel rank, microbatch) piece of the batch
    ref = reference(cfg, state, ids, labels, dp * microbatches, clip)
    return ref, dp, (cfg, pcfg, state, ids, labels, clip)


@pytest.mark.parametrize("world", [2, 4])
def test_pipeline_matches_single_process(world):
    names = [name for name, case in CASES.items() if case[1] == world]
    prepared = [_prepare(*CASES[name]) for name in names]
    results = run_distributed(_jobs_worker, world, [job for *_, job in prepared], timeout=300)
    for name, (ref, dp, job), per_rank in zip(names, prepared, zip(*results)):
        ref_losses, ref_grads, ref_norm = ref
        pcfg = job[1]
        seen, last_losses = set(), []
        for rank, (losses, grads, norm, last) in enumerate(per_rank):
            seen |= set(grads)
            bad = {n: e for n, g in grads.items() if not (e := rel_err(g, ref_grads[n])) < 1e-5}
            assert not bad, f"{name} rank {rank}: gradients differ {bad}"
            assert rel_err(torch.tensor(norm), torch.tensor(ref_norm)) < 1e-5, (name, norm, ref_norm)
            if last:
                last_losses.append(losses)
        assert seen == set(ref_grads), name
        mean = torch.tensor(last_losses).mean(0)  # the data-parallel ranks' last stages hold their own losses (tp peers: the same)
        assert len(last_losses) == dp * pcfg.tp and torch.allclose(mean, torch.tensor(ref_losses), rtol=1e-4), (name, mean, ref_losses)


def test_stage_split_is_contiguous_and_even():
    assert stage_layer_ids(5, 2) == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match="4 stages need at least as many layers"):
        stage_layer_ids(3, 4)
