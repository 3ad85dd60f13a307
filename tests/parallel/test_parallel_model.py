"""The whole model under each parallelism and their combinations (gloo, CPU): loss and gradients of
one step equal the single-process run on the same weights and batch (fp32, rel err < 1e-5), and a
few AdamW steps track the single-process loss curve."""
from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from linear_moe.layers.config import AttentionConfig, MixerConfig
from linear_moe.model.causal_lm import LinearMoEForCausalLM
from linear_moe.model.config import ModelConfig
from linear_moe.moe.config import MoEConfig
from linear_moe.parallel.config import ParallelConfig, ParallelOptions
from linear_moe.parallel.fsdp import clip_grad_norm_
from linear_moe.parallel.mesh import build_mesh
from linear_moe.parallel.parallelize import local_batch, local_cu_seqlens, parallelize_model
from parallel_testing import rel_err, run_distributed

VOCAB, BATCH, T, STEPS, LR = 64, 4, 16, 3, 3e-3


def model_config(mixer: str, pattern: str = "", aux: bool = True) -> ModelConfig:
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16, aux_loss_coef=0.01 if aux else 0.0)
    return ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, mixer=mixer, layer_pattern=pattern,
                       ffn_pattern="DE", intermediate_size=32, tie_embeddings=False,
                       attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                       mixer_options=MixerConfig(num_heads=4, chunk_size=4, mode="chunk"), moe=moe)


def _shards(batch: torch.Tensor, dp: int, sp: int):
    """Reference view of the data parallel split: the dp row-shards, whole sequences (sp joins them)."""
    return batch.chunk(dp, 0)


def reference(cfg: ModelConfig, state, ids, labels, dp: int, clip: float, cu_seqlens=None):
    """Single process: loss = mean over dp shards of the model's loss (what data parallelism averages)."""
    model = LinearMoEForCausalLM(cfg)
    model.load_state_dict(state)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, grads, norm = [], None, None
    for step in range(STEPS):
        loss = sum(model(i, labels=l, cu_seqlens=cu_seqlens).loss for i, l in zip(ids.chunk(dp), labels.chunk(dp))) / dp
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads, norm.item()


def _full_grad(name, p, cfg, mesh):
    g = p.grad
    g = (g.full_tensor() if isinstance(g, DTensor) else g).clone()  # clone: clipping scales .grad in place
    if ".experts." in name:  # expert weights are DTensors of the full [E, ...] shape, also under ep
        assert g.shape[0] == cfg.moe.num_experts, (name, tuple(g.shape))
    return g, slice(None)


def _worker(rank, world, cfg, pcfg, state, ids, labels, clip, options=None, ac="none", cu_seqlens=None):
    import torch.distributed as dist

    mesh = build_mesh(pcfg, world, num_heads=cfg.attention.num_heads, num_experts=cfg.moe.num_experts)
    model = LinearMoEForCausalLM(cfg)
    model.load_state_dict(state)
    options = options or ParallelOptions()
    parallelize_model(model, pcfg, mesh, options=options, activation_checkpointing=ac)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    my_ids, my_labels = local_batch(ids, mesh, options.sp_layout), local_batch(labels, mesh, options.sp_layout)
    my_cu = local_cu_seqlens(model, cu_seqlens, ids.shape[1])
    losses, grads, norm = [], {}, None
    for step in range(STEPS):
        loss = model(my_ids, labels=my_labels, cu_seqlens=my_cu).loss
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                grads[n] = _full_grad(n, p, cfg, mesh)
            norm = clip_grad_norm_(model, clip, mesh).item()
        opt.step()
        opt.zero_grad()
        report = loss.detach().clone()  # the loss over all data-parallel ranks
        dist.all_reduce(report)
        losses.append(report.item() / (mesh.dp_size * mesh.cfg.sp * mesh.cfg.tp * mesh.cfg.pp))
    return losses, grads, norm


def _jobs_worker(rank, world, jobs):
    return [_worker(rank, world, *job) for job in jobs]


def prepare(mixer, pattern, pcfg, world, aux=True, options=None, ac="none", packed=False):
    """The single-process run, and the arguments of the distributed one, for one case."""
    cfg = model_config(mixer, pattern, aux)
    gen = torch.Generator().manual_seed(torch.seed())
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    state = LinearMoEForCausalLM(cfg).state_dict()
    shape = (1, BATCH * T) if packed else (BATCH, T)  # packed: one row of documents crossing the sp ranks
    ids = torch.randint(0, VOCAB, shape, generator=gen)
    labels = torch.randint(0, VOCAB, shape, generator=gen)
    cu = None
    if packed:
        cuts = torch.unique(torch.randint(1, BATCH * T, (4,), generator=gen))
        cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([BATCH * T])])
    dp = build_mesh(pcfg, world).dp_size if world == 1 else pcfg.dp_replicate * (
        world // (pcfg.dp_replicate * pcfg.tp * pcfg.pp * pcfg.sp) if pcfg.dp_shard == -1 else pcfg.dp_shard)
    clip = 0.05  # small enough to clip: the clipped update must agree too
    ref = reference(cfg, state, ids, labels, dp, clip, cu)
    return ref, (cfg, pcfg, state, ids, labels, clip, options, ac, cu)


def compare(case, rank, result, ref):
    (losses, grads, norm), (ref_losses, ref_grads, ref_norm) = result, ref
    assert set(grads) == set(ref_grads), case
    bad = {n: e for n, (g, sl) in grads.items() if not (e := rel_err(g, ref_grads[n][sl])) < 1e-5}
    assert not bad, f"{case} rank {rank}: gradients differ {bad}"
    assert rel_err(torch.tensor(losses[0]), torch.tensor(ref_losses[0])) < 1e-5, (case, losses, ref_losses)
    assert rel_err(torch.tensor(norm), torch.tensor(ref_norm)) < 1e-5, (case, norm, ref_norm)
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4), (case, losses, ref_losses)


# id: (mixer, layer pattern, ParallelConfig, world size, aux losses on[, ParallelOptions, activation checkpointing,
#      packed documents])
CASES = {
    "fsdp2": ("gla", "", ParallelConfig(), 2, True),
    "tp2": ("gla", "LN", ParallelConfig(tp=2), 2, True),  # vocab-parallel ends (the default)
    "ep2": ("gla", "", ParallelConfig(ep=2), 2, True),
    # sp: the MoE balance loss (aux on) is the whole sequence's (parallel/sequence_moe.py)
    "sp2-hybrid": ("gated_deltanet", "LN", ParallelConfig(sp=2), 2, True),
    "sp2-zigzag-attention-ac": ("attention", "", ParallelConfig(sp=2), 2, True, ParallelOptions(sp_layout="zigzag"),
                                "selective"),
    "sp2-rwkv6-full-ac": ("rwkv6", "", ParallelConfig(sp=2), 2, False, None, "full"),
    "sp2-mom": ("mom_gla", "", ParallelConfig(sp=2), 2, True),  # the memories' balance loss too
    "tp2-gated_deltanet": ("gated_deltanet", "LN", ParallelConfig(tp=2, tp_vocab_parallel=False), 2, True),
    "hsdp2x2": ("linear_attention", "", ParallelConfig(dp_replicate=2), 4, True),
    "dp2xtp2": ("gla", "LN", ParallelConfig(tp=2, tp_sequence_parallel=True), 4, True),
    "dp4xep2": ("gla", "", ParallelConfig(ep=2), 4, True),
    "dp2xtp2xep2": ("gla", "LN", ParallelConfig(tp=2, ep=2), 4, True),
    "sp2xtp2": ("gla", "LN", ParallelConfig(sp=2, tp=2, tp_vocab_parallel=False), 4, True),
    # LASP-2 inside the tp region: RWKV6's token shift sees the sp rank's whole slice (gathered over tp)
    "sp2xtp2-seq-rwkv6": ("rwkv6", "", ParallelConfig(sp=2, tp=2, tp_sequence_parallel=True), 4, True),
    "dp2xtp2-deltanet": ("deltanet", "", ParallelConfig(tp=2), 4, True),
    "sp4-mamba2": ("mamba2", "", ParallelConfig(sp=4), 4, True),
    "sp4-packed-hybrid": ("gated_deltanet", "LN", ParallelConfig(sp=4), 4, True, None, "none", True),
}


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_runs_match_single_process(world):
    """Every case of this world size in one spawned job (process start-up dominates on CPU)."""
    names = [name for name, case in CASES.items() if case[3] == world]
    prepared = [prepare(*CASES[name]) for name in names]
    results = run_distributed(_jobs_worker, world, [job for _, job in prepared], timeout=300)
    for rank, per_case in enumerate(results):
        for name, (ref, _), result in zip(names, prepared, per_case):
            compare(name, rank, result, ref)
