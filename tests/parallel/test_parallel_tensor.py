"""Tensor parallelism for every token mixer (gloo, 2 CPU processes): the tp=2 model's loss and every
parameter gradient equal the single-process model's (float64, rel err < 1e-5), with the embedding /
LM head / loss split by vocabulary and with sequence-parallel norms. All cases run in one spawned
job (process start-up dominates on CPU); each rank builds the same model from the case's seed,
keeps an unsplit copy as the reference, and compares itself to it."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.distributed.tensor import DTensor

from linear_moe.layers.config import AttentionConfig, MixerConfig
from linear_moe.layers.registry import available_mixers
from linear_moe.model.causal_lm import LinearMoEForCausalLM
from linear_moe.model.config import ModelConfig
from linear_moe.moe.config import MoEConfig
from linear_moe.parallel.config import ParallelConfig
from linear_moe.parallel.mesh import build_mesh
from linear_moe.parallel.tensor import apply_tensor_parallel, tensor_parallel_mixers
from linear_moe.parallel.tensor_plans import mixer_plan
from parallel_testing import rel_err, run_distributed

VOCAB, BATCH, T, TOL = 64, 2, 8, 1e-5
# GSA computes its forget gates and slot softmax in float32 even for float64 inputs (``.float()``), so
# a different summation order (split projections) shows at float32's rounding there: up to 1.03e-4 seen in a
# k_proj gradient (seed 1253994198, sequence-parallel, 2026-11-25); a wrong plan errs by O(1).
TOLERANCE = {"gsa": 5e-4}
MIXER = MixerConfig(num_heads=4, chunk_size=4, mode="chunk", num_slots=4, state_size=8, num_memories=3,
                    topk_memories=2, gate_low_rank_dim=4, conv_size=3)
# tensor-parallel layouts: (vocab_parallel, sequence_parallel)
LAYOUTS = {"heads": (False, False), "vocab": (True, False), "sp": (True, True), "sp-replicated-vocab": (False, True)}


def model_config(mixer: str, tied: bool = False, **mixer_options) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, mixer=mixer, layer_pattern="LL",
                       ffn_pattern="DE", intermediate_size=32, tie_embeddings=tied,
                       attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                       mixer_options=dataclasses.replace(MIXER, **mixer_options),
                       moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16, aux_loss_coef=0.01))


def cases() -> dict[str, tuple]:
    """id -> (mixer, layout, tied embeddings, mixer options). Every registered mixer under each
    layout, plus the variants that take other paths through the plans."""
    out = {f"{m}-{layout}": (m, layout, False, {}) for m in available_mixers() for layout in ("heads", "vocab", "sp")}
    out.update({
        "gla-gqa": ("gla", "heads", False, {"num_kv_heads": 2}),
        "linear_attention-hedgehog": ("linear_attention", "vocab", False, {"feature_map": "hedgehog"}),
        "mamba2-groups2": ("mamba2", "sp", False, {"num_kv_heads": 2}),
        "mom_gla-shared": ("mom_gla", "vocab", False, {"shared_memory": True}),
        "mom_gated_deltanet-shared": ("mom_gated_deltanet", "heads", False, {"shared_memory": True}),
        "based-window": ("based", "sp", False, {"based_window": 3}),
        "retention-groupnorm": ("retention", "heads", False, {"output_norm": "groupnorm"}),
        "gla-tied": ("gla", "sp", True, {}),
        "gsa-conv": ("gsa", "heads", False, {"use_short_conv": True}),
        "hgrn2-conv": ("hgrn2", "vocab", False, {"use_short_conv": True}),
        "mamba2-noconv-nogate": ("mamba2", "heads", False, {"use_short_conv": False, "use_output_gate": False}),
        "gated_deltanet-sp-replicated-vocab": ("gated_deltanet", "sp-replicated-vocab", False, {}),
    })
    return out


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        g = p.grad
        out[n] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    return out


def _run_case(tp_mesh, seed: int, mixer: str, layout: str, tied: bool, options: dict):
    torch.manual_seed(seed)
    cfg = model_config(mixer, tied, **options)
    model = LinearMoEForCausalLM(cfg).double()
    ids = torch.randint(0, VOCAB, (BATCH, T))
    labels = torch.randint(0, VOCAB, (BATCH, T))
    labels[0, :2] = -100  # ignored positions take part too
    reference = copy.deepcopy(model)
    ref_loss = reference(ids, labels=labels).loss
    ref_loss.backward()
    vocab, sp = LAYOUTS[layout]
    apply_tensor_parallel(model, tp_mesh, vocab_parallel=vocab, sequence_parallel=sp)
    split = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    assert any(".mixer." in n for n in split) and model.layers[0].mixer.num_heads == 2, (mixer, split)
    loss = model(ids, labels=labels).loss
    loss.backward()
    grads, ref_grads = _grads(model), _grads(reference)
    assert set(grads) == set(ref_grads), (set(grads) ^ set(ref_grads))
    errors = {n: rel_err(g, ref_grads[n]) for n, g in grads.items()}
    errors["<loss>"] = rel_err(loss, ref_loss)
    return errors


def _worker(rank, world, jobs):
    mesh = build_mesh(ParallelConfig(tp=world), world)
    return {name: _run_case(mesh.submesh("tp"), seed, *case) for name, seed, case in jobs}


def _layer_outputs_worker(rank, world, seed):
    """Vocab-parallel pieces on their own: the loss op against F.cross_entropy (chunks, ignored labels),
    and the logits path (generation) gathered whole."""
    import torch.nn.functional as F

    from linear_moe.ops.cross_entropy import linear_cross_entropy

    mesh = build_mesh(ParallelConfig(tp=world), world)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 12, (10,), generator=gen)
    labels[3] = -100
    ref = F.cross_entropy(x @ w.t(), labels, ignore_index=-100)
    ref.backward()
    w_local = w.detach().chunk(world)[rank].clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    loss = linear_cross_entropy(x2, w_local, labels, chunk_size=4, process_group=mesh.submesh("tp").get_group())
    loss.backward()
    import torch.distributed as dist
    dist.all_reduce(x2.grad)  # each rank holds its vocabulary slice's part of dL/dx
    errors = {"loss": rel_err(loss, ref), "dx": rel_err(x2.grad, x.grad), "dw": rel_err(w_local.grad, w.grad.chunk(world)[rank])}
    for mixer, sp in (("gla", True), ("mamba2", False)):
        torch.manual_seed(seed)
        model = LinearMoEForCausalLM(model_config(mixer)).double().eval()
        ids = torch.randint(0, VOCAB, (BATCH, T))
        ref_logits, ref_tokens = model(ids).logits, model.generate(ids, 3)
        apply_tensor_parallel(model, mesh.submesh("tp"), vocab_parallel=True, sequence_parallel=sp)
        errors[f"logits-{mixer}"] = rel_err(model(ids).logits, ref_logits)
        if not sp:  # decoding one token at a time, each rank's heads carrying their own states
            errors[f"generate-{mixer}"] = float(not torch.equal(model.generate(ids, 3), ref_tokens))
        else:  # logits of a slice of a rank's shard (logits_to_keep), or one-token steps: refused clearly
            for name, call in (("generate", lambda: model.generate(ids, 3)), ("one-token", lambda: model(ids[:, :1]))):
                try:
                    call()
                    errors[f"{name}-refused-{mixer}"] = 1.0
                except ValueError as e:
                    errors[f"{name}-refused-{mixer}"] = float("tp_sequence_parallel" not in str(e))
    return errors


def test_every_mixer_tp2_matches_single_process():
    assert set(tensor_parallel_mixers()) == set(available_mixers())
    gen = torch.Generator().manual_seed(torch.seed())
    jobs = [(name, int(torch.randint(0, 2**31, (1,), generator=gen)), case) for name, case in cases().items()]
    jobs.append(("<ops>", int(torch.randint(0, 2**31, (1,), generator=gen)), None))
    results = run_distributed(_jobs_dispatch, 2, jobs, timeout=240)
    bad = {}
    for rank, per_case in enumerate(results):
        for name, errors in per_case.items():
            tol = TOLERANCE.get(name.split("-")[0], TOL)
            worst = max(errors, key=errors.get)
            if not errors[worst] < tol:
                bad[f"{name} rank {rank}"] = (worst, errors[worst], sum(e >= tol for e in errors.values()))
    assert not bad, f"tp=2 differs from one process (seeds {[(n, s) for n, s, _ in jobs]}): {bad}"


def _jobs_dispatch(rank, world, jobs):
    out = _worker(rank, world, [j for j in jobs if j[2] is not None])
    for name, seed, case in jobs:
        if case is None:
            out[name] = _layer_outputs_worker(rank, world, seed)
    return out


@pytest.mark.parametrize("mixer, options, tp, message", [
    ("mamba2", {"num_heads": 6, "num_kv_heads": 3, "head_dim": 8}, 2, "num_kv_heads"),
    ("gla", {"num_heads": 3, "head_dim": 8, "expand_v": 0.75}, 2, "num_heads=3"),
    ("attention", {}, 4, "num_kv_heads=2"),
])
def test_unsplittable_mixer_raises(mixer, options, tp, message):
    cfg = model_config(mixer, **options)
    block = LinearMoEForCausalLM(dataclasses.replace(cfg, num_layers=1, layer_pattern="L", ffn_pattern="D")).layers[0]
    with pytest.raises(ValueError, match=message):
        mixer_plan(block.mixer, block.mixer_name, tp, 0)


def test_unknown_mixer_raises():
    with pytest.raises(ValueError, match="no tensor-parallel plan"):
        mixer_plan(torch.nn.Linear(2, 2), "not_a_mixer", 2, 0)


def _fsdp_worker(rank, world, jobs):
    """dp=2 × tp=2: FSDP2 over the tensor-parallel model (vocab-parallel, sequence-parallel norms);
    the reference is the mean of the one-process losses of the two dp row-shards."""
    from linear_moe.parallel.fsdp import apply_fsdp, clip_grad_norm_

    mesh = build_mesh(ParallelConfig(tp=2), world)
    out = {}
    for name, seed, mixer in jobs:
        torch.manual_seed(seed)
        model = LinearMoEForCausalLM(model_config(mixer)).double()
        ids = torch.randint(0, VOCAB, (2 * BATCH, T))
        labels = torch.randint(0, VOCAB, (2 * BATCH, T))
        reference = copy.deepcopy(model)
        ref_loss = sum(reference(i, labels=l).loss for i, l in zip(ids.chunk(2), labels.chunk(2))) / 2
        ref_loss.backward()
        ref_grads = _grads(reference)
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        apply_tensor_parallel(model, mesh.submesh("tp"), vocab_parallel=True, sequence_parallel=True)
        apply_fsdp(model, mesh)
        rows = slice(mesh.dp_rank * BATCH, (mesh.dp_rank + 1) * BATCH)
        loss = model(ids[rows], labels=labels[rows]).loss
        loss.backward()
        grads = _grads(model)
        norm = clip_grad_norm_(model, 0.05, mesh)
        errors = {n: rel_err(g, ref_grads[n]) for n, g in grads.items()}
        report = loss.detach().clone()
        torch.distributed.all_reduce(report)
        errors["<loss>"] = rel_err(report / world, ref_loss)
        errors["<norm>"] = rel_err(norm, ref_norm)
        out[name] = errors
    return out


def test_fsdp_over_tensor_parallel_matches_single_process():
    """Picked rows (MoM, Mamba2's B/C), Mamba2's split group norm and the vocab-parallel ends under FSDP2."""
    gen = torch.Generator().manual_seed(torch.seed())
    jobs = [(m, int(torch.randint(0, 2**31, (1,), generator=gen)), m) for m in ("mamba2", "mom_gla")]
    results = run_distributed(_fsdp_worker, 4, jobs, timeout=240)
    bad = {f"{name} rank {rank}": (worst, errors[worst]) for rank, per_case in enumerate(results)
           for name, errors in per_case.items() if not errors[worst := max(errors, key=errors.get)] < TOL}
    assert not bad, f"dp2 x tp2 differs from one process (seeds {jobs}): {bad}"
