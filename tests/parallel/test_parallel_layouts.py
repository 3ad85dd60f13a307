"""Combined layouts on 4 gloo processes, driven by the trainer: dp=2 × tp=2 with the experts over
ep=2, pp=2 × dp=2 (1F1B), and sp=2 × tp=2 with tensor sequence parallelism; each trains 3 steps from the same initial weights and data as one
process and logs the same losses (fp32, rel err < 1e-4), then evaluates the same held-out loss.
The same processes check the trainer's device-side skip of a non-finite step on FSDP shards."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from linear_moe.config import build_job_config
from linear_moe.data.testing import tiny_dataset
from linear_moe.train.trainer import train
from parallel_testing import run_distributed

MODEL = [("model.hidden_size", "32"), ("model.num_layers", "2"), ("model.layer_pattern", "LN"),
         ("model.mixer", "gated_deltanet"), ("model.intermediate_size", "64"), ("model.moe.num_experts", "4"),
         ("model.moe.expert_hidden_size", "32"), ("model.attention.num_heads", "2"), ("model.moe.aux_loss_coef", "0"),
         ("model.vocab_size", "512"), ("model.tie_embeddings", "false")]
RUN = [("data.max_chars", "200000"), ("train.seq_len", "16"), ("train.max_steps", "3"), ("train.eval_batches", "1"),
       ("train.eval_interval", "0"), ("train.log_interval", "1"), ("train.warmup_steps", "1"), ("train.lr", "1e-2"),
       ("train.precision", "fp32"), ("train.device", "cpu")]
LAYOUTS = {  # name -> (parallel overrides, data-parallel ranks); every layout reads a global batch of 4 sequences
    "dp2xtp2xep2": ([("parallel.dp_shard", "2"), ("parallel.tp", "2"), ("parallel.ep", "2")], 2),  # vocab-parallel tp
    "pp2xdp2": ([("parallel.pp", "2"), ("parallel.dp_shard", "2"), ("parallel.pp_microbatches", "2")], 2),
    # LASP-2 inside tensor parallelism with the sequence split over tp too, the vocabulary not split
    "sp2xtp2-seq": ([("parallel.sp", "2"), ("parallel.tp", "2"), ("parallel.tp_sequence_parallel", "true"),
                     ("parallel.tp_vocab_parallel", "false")], 1),
}


def _job(root: str, name: str, batch: int, parallel=()):
    return build_job_config(overrides=MODEL + RUN + list(parallel) + [
        ("train.batch_size", str(batch)), ("train.output_dir", str(Path(root) / "runs")), ("train.run_name", name),
        ("data.cache_dir", str(Path(root) / "cache"))])


def _fused_adamw_skips_on_fsdp_shards(world):
    """The trainer's device-side skip (fused AdamW ``found_inf``) on FSDP-sharded (DTensor) parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from linear_moe.train.trainer import step_unless_nonfinite

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.randn(3, 4)).sum().backward()
    before = [p.full_tensor().clone() for p in model.parameters()]
    skipped = step_unless_nonfinite(opt, torch.tensor(False))
    kept = all(torch.equal(b, p.full_tensor()) for b, p in zip(before, model.parameters()))
    counts = {s["step"].item() for s in opt.state.values()}
    stepped = step_unless_nonfinite(opt, torch.tensor(True))
    moved = all(not torch.equal(b, p.full_tensor()) for b, p in zip(before, model.parameters()))
    return skipped is None and stepped is None and kept and counts == {0.0} and moved


def _worker(rank, world, root, names):
    out = {}
    for name in names:
        parallel, dp = LAYOUTS[name]
        result = train(_job(root, name, 4 // dp, parallel), quiet=True)
        out[name] = (result.losses, result.eval_loss)
    out["fused_skip"] = _fused_adamw_skips_on_fsdp_shards(world)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    tiny_dataset(root / "cache", vocab_size=512, max_chars=200_000)  # built once, before the ranks start
    return root


def test_combined_layouts_match_one_process(root):
    single = train(_job(str(root), "single", 4), quiet=True)
    per_rank = run_distributed(_worker, 4, str(root), list(LAYOUTS), timeout=420)
    for name in LAYOUTS:
        (losses, eval_loss), *others = [r[name] for r in per_rank]
        assert all(o == (losses, eval_loss) for o in others), (name, per_rank)  # every rank logs the same numbers
        assert len(losses) == 3, (name, losses)
        for a, b in zip(losses, single.losses):
            assert abs(a - b) <= 1e-4 * abs(b), (name, losses, single.losses)
        assert abs(eval_loss - single.eval_loss) <= 1e-4 * abs(single.eval_loss), (name, eval_loss, single.eval_loss)
    assert all(r["fused_skip"] for r in per_rank)


def test_tp_options_reach_the_parallel_config_from_overrides():
    job = build_job_config(overrides=[("parallel.tp_vocab_parallel", "false"), ("parallel.tp_sequence_parallel", "true")])
    assert job.parallel.tp_vocab_parallel is False and job.parallel.tp_sequence_parallel is True
    assert build_job_config().parallel.tp_vocab_parallel is True  # Megatron's / torchtitan's default
