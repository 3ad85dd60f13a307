"""The trainer under torch.distributed (gloo, CPU): each layout's losses equal the one-process run of
the same global batch, and a real `torchrun` launch of the CLI trains and writes a sharded checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from parallel_testing import run_distributed  # noqa: E402

from linear_moe.config import build_job_config  # noqa: E402
from linear_moe.data.testing import tiny_dataset  # noqa: E402
from linear_moe.model.causal_lm import LinearMoEForCausalLM  # noqa: E402
from linear_moe.train.checkpoint import load_checkpoint  # noqa: E402
from linear_moe.train.trainer import train  # noqa: E402

BASE = [("model.hidden_size", "32"), ("model.num_layers", "2"), ("model.intermediate_size", "64"),
        ("model.moe.num_experts", "4"), ("model.moe.expert_hidden_size", "32"), ("model.attention.num_heads", "2"),
        ("model.moe.aux_loss_coef", "0"), ("model.vocab_size", "512"), ("data.max_chars", "200000"),
        ("train.seq_len", "32"), ("train.max_steps", "3"), ("train.eval_batches", "2"), ("train.eval_interval", "0"),
        ("train.log_interval", "1"), ("train.warmup_steps", "1"), ("train.lr", "1e-2")]

CASES = {  # name -> (parallel overrides, model overrides)
    "fsdp": ([("parallel.dp_shard", "2")], [("model.mixer", "gated_deltanet"), ("model.layer_pattern", "LN")]),
    "tp": ([("parallel.tp", "2"), ("parallel.dp_shard", "1")], [("model.mixer", "gla"), ("model.layer_pattern", "LN")]),
    "sp": ([("parallel.sp", "2"), ("parallel.dp_shard", "1")], [("model.mixer", "gated_deltanet"), ("model.layer_pattern", "LN")]),
    "dp_ep": ([("parallel.dp_shard", "2"), ("parallel.ep", "2")], [("model.mixer", "gated_deltanet"), ("model.layer_pattern", "LN")]),
}


def _job(root: str, name: str, batch: int, extra):
    return build_job_config(overrides=BASE + list(extra) + [
        ("train.batch_size", str(batch)), ("train.output_dir", str(Path(root) / "runs")), ("train.run_name", name),
        ("data.cache_dir", str(Path(root) / "cache"))])


def _worker(rank, world, root, case):
    parallel, model = CASES[case]
    result = train(_job(root, f"{case}-dist", 2, parallel + model), quiet=True)
    return result.losses, result.eval_loss, str(result.checkpoint)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tiny_dataset(root / "cache", vocab_size=512, max_chars=200_000)  # build once, before the ranks start
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_one_process(root, case):
    parallel, model = CASES[case]
    dp = 2 if case in ("fsdp", "dp_ep") else 1
    single = train(_job(str(root), f"{case}-single", 2 * dp, model), quiet=True)
    results = run_distributed(_worker, 2, str(root), case, timeout=240)
    (losses0, eval0, ckpt0), (losses1, eval1, _) = results
    assert losses0 == losses1 and eval0 == eval1  # every rank logs the same averaged numbers
    assert abs(losses0[0] - single.losses[0]) <= 1e-5 * abs(single.losses[0])
    for a, b in zip(losses0, single.losses):
        assert abs(a - b) <= 1e-3 * abs(b), (losses0, single.losses)
    assert abs(eval0 - single.eval_loss) <= 1e-3 * abs(single.eval_loss)
    assert (Path(ckpt0) / "dcp" / ".metadata").is_file()


FSDP_BF16 = [("parallel.dp_shard", "2"), ("parallel.fsdp_param_dtype", "bfloat16"), ("train.precision", "bf16")]
GDN_LN = [("model.mixer", "gated_deltanet"), ("model.layer_pattern", "LN")]


def _bf16_worker(rank, world, root):
    result = train(_job(root, "fsdp-bf16-dist", 2, FSDP_BF16 + GDN_LN), quiet=True)
    return result.losses, str(result.checkpoint)


def test_fsdp_bf16_parameters_train_like_fp32_masters(root):
    """parallel.fsdp_param_dtype=bfloat16: blocks gather bf16 parameters (master weights stay fp32 in the
    checkpoint); the losses follow the one-process bf16-autocast run to bf16 rounding."""
    single = train(_job(str(root), "fsdp-bf16-single", 4, GDN_LN + [("train.precision", "bf16")]), quiet=True)
    (losses, ckpt), _ = run_distributed(_bf16_worker, 2, str(root), timeout=240)
    assert len(losses) == 3 and all(abs(a - b) <= 3e-2 * abs(b) for a, b in zip(losses, single.losses)), (losses, single.losses)
    model = LinearMoEForCausalLM(_job(str(root), "x", 2, GDN_LN).model)
    load_checkpoint(Path(ckpt), model)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fsdp_options_reach_parallelize(monkeypatch):
    """The parallel.fsdp_* fields are what the trainer hands to parallelize_model / parallelize_pipeline."""
    from types import SimpleNamespace

    from linear_moe.train import trainer

    seen = []
    monkeypatch.setattr(trainer, "parallelize_model", lambda model, cfg, mesh, **kw: seen.append(kw["options"]))
    monkeypatch.setattr(trainer, "parallelize_pipeline", lambda model, cfg, mesh, device, **kw: seen.append(kw["options"]))
    for pp in ("1", "2"):
        job = build_job_config(overrides=BASE + GDN_LN + [("parallel.pp", pp), ("parallel.fsdp_param_dtype", "bfloat16"),
                                                 ("parallel.fsdp_reduce_dtype", "float16"),
                                                 ("parallel.fsdp_reshard_after_forward", "false")])
        trainer.build_model(job, torch.device("cpu"), SimpleNamespace(enabled=True, mesh=None))
    assert [(o.param_dtype, o.reduce_dtype, o.reshard_after_forward) for o in seen] == [("bfloat16", "float16", False)] * 2


def test_torchrun_launches_the_cli(root):
    """`torchrun --nproc-per-node 2 -m linear_moe train --parallel.tp 2 ...` on CPU (gloo)."""
    args = []
    for k, v in BASE + [("parallel.tp", "2"), ("parallel.dp_shard", "1"), ("model.mixer", "gated_deltanet"),
                        ("model.layer_pattern", "LN"), ("train.batch_size", "2"), ("train.output_dir", str(root / "runs")),
                        ("train.run_name", "torchrun"), ("data.cache_dir", str(root / "cache"))]:
        args += [f"--{k}", v]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "linear_moe", "train", "--quiet", *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (root / "runs" / "torchrun" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert (root / "runs" / "torchrun" / "checkpoints" / "step_00000003" / "dcp").is_dir()


def _resume_worker(rank, world, root, ckpt):
    job = _job(root, "resume-dist", 2, [("parallel.dp_shard", "2"), ("train.max_steps", "4"), ("model.mixer", "gated_deltanet"),
                                        ("model.layer_pattern", "LN")])
    return train(job, resume=ckpt, quiet=True).losses


def test_a_one_process_checkpoint_resumes_under_fsdp(root):
    """Model and AdamW state saved by one process continue under two FSDP ranks as if nothing changed."""
    import shutil

    extra = [("train.max_steps", "4"), ("train.ckpt_interval", "2"), ("model.mixer", "gated_deltanet"), ("model.layer_pattern", "LN")]
    first = train(_job(str(root), "resume-single", 4, extra), quiet=True, stop_after=2)
    shutil.copytree(first.run_dir, root / "runs" / "resume-copy")
    reference = train(_job(str(root), "resume-single", 4, extra), resume=first.run_dir / "checkpoints" / "step_00000002", quiet=True)
    ckpt = root / "runs" / "resume-copy" / "checkpoints" / "step_00000002"
    losses0, losses1 = run_distributed(_resume_worker, 2, str(root), str(ckpt), timeout=240)
    assert losses0 == losses1 and len(losses0) == 2
    for a, b in zip(losses0, reference.losses):
        assert abs(a - b) <= 1e-5 * abs(b), (losses0, reference.losses)


def test_the_model_is_initialised_on_the_device(monkeypatch):
    """build_model draws the weights on the training device (meta stands in for a GPU here), not on the CPU and then
    copies them (81 s for A0.3B-2B on a 2-core CPU); on the CPU the weights are those of the seed as before."""
    from types import SimpleNamespace

    from linear_moe.model.causal_lm import LinearMoEForCausalLM
    from linear_moe.train import trainer

    job = build_job_config(overrides=BASE + GDN_LN)
    off = SimpleNamespace(enabled=False, mesh=None)
    seen = []

    def recording(cfg):
        seen.append(torch.get_default_device().type)  # where the constructor's tensors are drawn
        return LinearMoEForCausalLM(cfg)
    monkeypatch.setattr(trainer, "LinearMoEForCausalLM", recording)
    model = trainer.build_model(job, torch.device("meta"), off)
    assert seen == ["meta"] and {p.device.type for p in model.parameters()} == {"meta"}
    built = trainer.build_model(job, torch.device("cpu"), off)
    torch.manual_seed(job.train.seed)
    direct = LinearMoEForCausalLM(job.model)
    for (name, a), b in zip(built.state_dict().items(), direct.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
