"""Pipeline parallelism driven by the trainer: a real `torchrun` launch of the CLI with interleaved
1F1B on 2 ranks (4 stages) trains with MoE aux losses carried through the stages, logs the LM loss
and the aux loss apart (equal to the one-process values over the same microbatches), writes a DCP
checkpoint that loads into one process and resumes under pp as if uninterrupted; bad layouts are
refused with a message naming the field; a fused AdamW skips a non-finite step on the device."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linear_moe.config import ConfigError, build_job_config
from linear_moe.data.testing import tiny_dataset
from linear_moe.model.causal_lm import LinearMoEForCausalLM
from linear_moe.parallel.config import ParallelConfig
from linear_moe.train.checkpoint import load_checkpoint
from linear_moe.train.data import open_training_data
from linear_moe.train.distributed import check_layout
from linear_moe.train.trainer import step_unless_nonfinite

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from parallel_testing import run_distributed  # noqa: E402

OVERRIDES = [("model.hidden_size", "32"), ("model.num_layers", "4"), ("model.layer_pattern", "LLLN"),
             ("model.mixer", "gated_deltanet"), ("model.intermediate_size", "64"), ("model.moe.num_experts", "4"),
             ("model.moe.expert_hidden_size", "32"), ("model.attention.num_heads", "2"), ("model.moe.aux_loss_coef", "0.01"),
             ("model.vocab_size", "512"), ("model.tie_embeddings", "false"), ("data.max_chars", "200000"),
             ("train.seq_len", "16"), ("train.batch_size", "4"), ("train.max_steps", "4"), ("train.ckpt_interval", "2"),
             ("train.eval_batches", "1"), ("train.eval_interval", "0"), ("train.log_interval", "1"),
             ("train.warmup_steps", "1"), ("train.lr", "1e-2"), ("train.precision", "fp32"), ("train.device", "cpu"),
             ("parallel.pp", "2"), ("parallel.pp_schedule", "Interleaved1F1B")]


def _torchrun(root: Path, name: str, *extra: str):
    args = []
    for k, v in OVERRIDES + [("train.output_dir", str(root / "runs")), ("train.run_name", name),
                             ("data.cache_dir", str(root / "cache"))]:
        args += [f"--{k}", v]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "linear_moe", "train", "--quiet", *args, *extra],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(x) for x in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def _one_process_step1(root: Path):
    """LM loss and balance loss of the initial weights, averaged over the 4 one-row microbatches."""
    job = build_job_config(overrides=OVERRIDES + [("data.cache_dir", str(root / "cache")), ("parallel.pp", "1"),
                                                  ("parallel.pp_schedule", "1F1B")])
    torch.manual_seed(job.train.seed)
    model = LinearMoEForCausalLM(job.model)
    batch = open_training_data(job).train_batch(0)
    outs = [model(x, labels=y) for x, y in zip(batch.input_ids.chunk(4), batch.labels.chunk(4))]
    return (sum(o.lm_loss.item() for o in outs) / 4, sum(o.aux_losses["moe_balance_loss"].item() for o in outs) / 4,
            job)


@pytest.fixture(scope="module")
def pp_run(tmp_path_factory):
    """One torchrun launch: 4 steps, checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("pp")
    tiny_dataset(root / "cache", vocab_size=512, max_chars=200_000)
    rows = _torchrun(root, "pp")
    return root, {r["step"]: r for r in rows if "loss" in r}


def test_torchrun_pipeline_trains_and_logs_lm_and_aux_losses(pp_run):
    root, losses = pp_run
    assert sorted(losses) == [1, 2, 3, 4]
    lm1, aux1, job = _one_process_step1(root)
    assert abs(losses[1]["loss"] - lm1) <= 1e-5 * lm1, (losses[1], lm1)  # the LM loss alone is logged
    assert aux1 > 0 and abs(losses[1]["moe_balance_loss"] - aux1) <= 1e-5 * aux1, (losses[1], aux1)
    assert losses[4]["loss"] < losses[1]["loss"]
    # expert load gathered from both pp ranks: one row per MoE layer (of its last microbatch: 1 x 16 tokens)
    load = torch.tensor(losses[1]["expert_load"])
    assert load.shape == (job.model.resolved_ffn_pattern().count("E"), job.model.moe.num_experts)
    assert torch.all(load.sum(-1) == 16 * job.model.moe.top_k)
    # the pp checkpoint (each rank saved its stages) is one whole model for one process
    ckpt = root / "runs" / "pp" / "checkpoints" / "step_00000004"
    assert (ckpt / "dcp" / ".metadata").is_file()
    model = LinearMoEForCausalLM(job.model)
    before = model.lm_head.weight.clone()
    load_checkpoint(ckpt, model)
    assert not torch.equal(before, model.lm_head.weight)


def _resume_worker(rank, world, root, run):
    from linear_moe.train.trainer import train

    job = build_job_config(overrides=OVERRIDES + [("train.output_dir", str(Path(root) / "runs")), ("train.run_name", run),
                                                  ("data.cache_dir", str(Path(root) / "cache"))])
    return train(job, resume=str(Path(root) / "runs" / run), quiet=True).losses


def test_pipeline_checkpoint_resumes_as_if_uninterrupted(pp_run):
    import shutil

    root, losses = pp_run
    shutil.copytree(root / "runs" / "pp", root / "runs" / "pp-resumed")
    shutil.rmtree(root / "runs" / "pp-resumed" / "checkpoints" / "step_00000004")
    os.environ["WORLD_SIZE"] = "2"  # what torchrun sets; init_distributed reads it
    try:
        resumed, _ = run_distributed(_resume_worker, 2, str(root), "pp-resumed", timeout=240)
    finally:
        del os.environ["WORLD_SIZE"]
    assert len(resumed) == 2
    for got, step in zip(resumed, (3, 4)):
        assert abs(got - losses[step]["loss"]) <= 1e-6 * losses[step]["loss"], (resumed, losses)


@pytest.mark.parametrize("overrides, message", [
    ([("parallel.pp", "2"), ("data.packing", "true")], "does not support data.packing"),
    ([("parallel.pp", "2"), ("train.grad_accum", "2")], "train.grad_accum=2 with parallel.pp=2"),
    ([("parallel.pp", "2"), ("model.num_layers", "3")], "model.num_layers=3 must be divisible by the 2 pipeline stages"),
    ([("parallel.pp", "2"), ("parallel.pp_microbatches", "3"), ("train.batch_size", "4")],
     "train.batch_size=4 .* must be divisible by parallel.pp_microbatches=3"),
    ([("parallel.pp", "2"), ("parallel.pp_schedule", "Interleaved1F1B"), ("model.num_layers", "2")],
     "divisible by the 4 pipeline stages"),
    ([("parallel.pp", "2"), ("model.tie_embeddings", "true")], "tie_embeddings=false"),
])
def test_bad_pipeline_layouts_are_refused(overrides, message):
    job = build_job_config(overrides=[("model.num_layers", "4"), ("model.tie_embeddings", "false"),
                                      ("train.batch_size", "4")] + overrides)
    with pytest.raises(ConfigError, match=message):
        check_layout(job)


@pytest.mark.parametrize("kwargs, message", [
    (dict(pp=2, pp_schedule="ZeroBubble"), "pp_schedule='ZeroBubble' is not one of 1F1B, Interleaved1F1B, GPipe"),
    (dict(pp=2, pp_microbatches=1), "pp_microbatches=1 must be >= the 2 pipeline stages for pp_schedule=1F1B"),
    (dict(pp=2, pp_stages_per_rank=2), "pp_stages_per_rank=2: use 1"),
    (dict(pp=2, pp_schedule="Interleaved1F1B", pp_stages_per_rank=1), "pp_stages_per_rank=1"),
    (dict(pp=4, pp_schedule="Interleaved1F1B", pp_microbatches=9), "multiple of the number of rounds 2"),
])
def test_bad_pipeline_configs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs).validate(world_size=kwargs["pp"])


def test_fused_adamw_skips_a_nonfinite_step_on_the_device():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=gen))
    ref = torch.nn.Parameter(p.detach().clone())
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    ref_opt = torch.optim.AdamW([ref], lr=0.1)
    grads = [torch.randn(5, 3, generator=gen) for _ in range(3)]
    for i, g in enumerate(grads):
        p.grad = g.clone() if i != 1 else torch.full_like(g, float("nan"))
        assert step_unless_nonfinite(opt, torch.isfinite(p.grad.norm())) is None  # nothing read back
        if i != 1:
            ref.grad = g.clone()
            ref_opt.step()
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    assert opt.state[p]["step"].item() == 2 and torch.isfinite(opt.state[p]["exp_avg"]).all()
    plain = torch.optim.AdamW([ref], lr=0.1)
    ref.grad = torch.full_like(ref, float("inf"))
    before = ref.detach().clone()
    assert step_unless_nonfinite(plain, torch.isfinite(ref.grad.norm())) is False and torch.equal(before, ref.detach())
