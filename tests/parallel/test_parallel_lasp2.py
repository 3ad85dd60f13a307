"""LASP-2 / LASP-2H: every token mixer run with its sequence split over 2 and 4 gloo ranks gives the
single-process output and gradients (float64, so any mistake in the state algebra shows; the layers
that compute their gates in fp32 get an fp32-sized tolerance)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from linear_moe.layers import AttentionConfig, MixerConfig, build_mixer
from linear_moe.parallel.lasp2 import Lasp2Handler, shard_sequence, wrap_mixer
from parallel_testing import rel_err, run_distributed

HIDDEN, T, BATCH = 16, 24, 2
FP32_GATES = {"hgrn2": 1e-4, "mom_gla": 1e-4, "mom_gated_deltanet": 1e-4}  # .float() inside the layer


def _tolerance(case: str) -> float:
    return FP32_GATES.get(case, 1e-6)  # strong decays lose a few digits in exp(): ~1e-8 seen
SMALL_CHUNKS = dict(mode="chunk", chunk_size=4)  # exercise the chunked forms on short shards
# id -> (mixer name, MixerConfig overrides, AttentionConfig overrides)
CASES = {
    "linear_attention-normalize": ("linear_attention", dict(normalize=True), {}),      # no decay
    "retention": ("retention", SMALL_CHUNKS, {}),                                       # constant decay, rotary
    "lightning_attention": ("lightning_attention", {}, {}),
    "mamba2": ("mamba2", dict(state_size=4), {}),                                       # scalar decay + short conv
    "gla": ("gla", SMALL_CHUNKS, {}),                                                   # vector decay
    "hgrn2": ("hgrn2", {}, {}),
    "rwkv6": ("rwkv6", {}, {}),                                                         # bonus + token shift
    "deltanet": ("deltanet", SMALL_CHUNKS, {}),                                         # delta rule + short conv
    "gated_deltanet": ("gated_deltanet", {}, {}),
    "gsa": ("gsa", dict(num_slots=4), {}),
    "mom_gla": ("mom_gla", dict(num_memories=3, topk_memories=2), {}),
    "mom_gated_deltanet": ("mom_gated_deltanet", dict(num_memories=3, topk_memories=2, shared_memory=True), {}),
    "based-window": ("based", dict(head_dim=4, based_window=5), {}),                   # + sliding-window attention
    "attention-gqa": ("attention", {}, dict(num_kv_heads=1)),                           # LASP-2H
}


def _build(case):
    name, mixer_kw, att_kw = CASES[case]
    mixer = build_mixer(name, HIDDEN, MixerConfig(num_heads=2, **mixer_kw), AttentionConfig(num_heads=2, **att_kw), 1, 3)
    return mixer.double()


def _reference(case, gen, cu_seqlens=None):
    mixer = _build(case)
    with torch.no_grad():
        for p in mixer.parameters():  # fresh, non-trivial values for every parameter
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    batch = BATCH if cu_seqlens is None else 1
    x = torch.randn(batch, T, HIDDEN, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(batch, T, HIDDEN, dtype=torch.float64, generator=gen)
    y, _ = mixer(x, cu_seqlens=cu_seqlens)
    (y * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}
    return mixer.state_dict(), x.detach(), w, y.detach(), x.grad, grads, cu_seqlens


def _sp_worker(rank, world, cases, layout):
    errors = {}
    for case, (state, x, w, y_ref, dx_ref, grads_ref, cu_seqlens) in cases.items():
        mixer = _build(case)
        mixer.load_state_dict(state)
        handler = Lasp2Handler(dist.group.WORLD, layout)
        local_cu = handler.set_documents(cu_seqlens, T)
        wrap_mixer(mixer, handler)
        x_local = shard_sequence(x, rank, world, layout).clone().requires_grad_(True)
        y, _ = mixer(x_local, cu_seqlens=local_cu)
        (y * shard_sequence(w, rank, world, layout)).sum().backward()
        errs = {"y": rel_err(y, shard_sequence(y_ref, rank, world, layout)),
                "dx": rel_err(x_local.grad, shard_sequence(dx_ref, rank, world, layout))}
        for n, p in mixer.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)  # every shard's contribution to the full-sequence gradient
            if n in grads_ref:
                errs[n] = rel_err(g, grads_ref[n])
        errors[case] = errs
    return errors


PACKED = ["retention", "mamba2", "gla", "gated_deltanet", "gsa", "based-window", "attention-gqa"]


def _random_documents(gen) -> torch.Tensor:
    """3 to 5 documents, some shorter than the conv width, one boundary on a rank boundary."""
    cuts = torch.randperm(T - 1, generator=gen)[:3] + 1
    cuts = torch.unique(torch.cat([cuts, torch.tensor([T // 2])]))
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([T])])


def _jobs_worker(rank, world, jobs):
    return [_sp_worker(rank, world, cases, layout) for cases, layout in jobs]


def _assert_close(world, rank, cases, errors, what):
    for case, errs in errors.items():
        bad = {k: v for k, v in errs.items() if not v < _tolerance(case)}
        assert not bad, f"{what} sp={world} rank {rank} {case} documents {cases[case][-1]}: {bad}"


@pytest.mark.parametrize("world", [2, 4])
def test_lasp2_every_mixer_matches_single_process(world):
    """Every mixer on whole sequences, the packed-document subset with documents crossing ranks, and
    (sp=2) LASP-2H attention on the zigzag layout: one spawned job."""
    gen = torch.Generator().manual_seed(torch.seed())
    jobs = [({case: _reference(case, gen) for case in CASES}, "contiguous"),
            ({case: _reference(case, gen, _random_documents(gen)) for case in PACKED}, "contiguous")]
    if world == 2:
        jobs.append(({"attention-gqa": _reference("attention-gqa", gen)}, "zigzag"))
    results = run_distributed(_jobs_worker, world, jobs, timeout=300)
    for rank, per_job in enumerate(results):
        for (cases, layout), errors in zip(jobs, per_job):
            _assert_close(world, rank, cases, errors, layout)
