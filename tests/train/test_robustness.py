"""Non-finite steps are skipped and bounded; SIGTERM saves and exits; SIGKILL + resume loses nothing."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from linear_moe.train import trainer as trainer_mod
from linear_moe.train.checkpoint import list_checkpoints
from linear_moe.train.trainer import TrainingDiverged, train

from .test_trainer import TINY, job_for


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, data_dir, monkeypatch):
    calls = {"n": 0}
    real_forward = trainer_mod.LinearMoEForCausalLM.forward

    def forward(self, *a, **k):
        out = real_forward(self, *a, **k)
        calls["n"] += 1
        if self.training and calls["n"] in (3, 4):  # steps 3 and 4 (batch_size 1 micro-batch per step)
            out.loss = out.loss * float("nan")
            out.lm_loss = out.lm_loss * float("nan")
        return out

    monkeypatch.setattr(trainer_mod.LinearMoEForCausalLM, "forward", forward)
    result = train(job_for(tmp_path, data_dir, steps=6, **{"train.run_name": "nan", "train.max_skipped_steps": 3}), quiet=True)
    assert result.skipped_steps == 2 and result.step == 6 and len(result.losses) == 4
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped_nonfinite")] == [3, 4]
    for p in torch.load(result.checkpoint / "optimizer.pt", weights_only=True)["state"].values():
        assert torch.isfinite(p["exp_avg"]).all()

    calls["n"] = 0
    job = job_for(tmp_path, data_dir, steps=8, **{"train.run_name": "nan2", "train.max_skipped_steps": 1,
                                                   "train.ckpt_interval": 2})
    with pytest.raises(TrainingDiverged, match=r"step 4: 2 steps with a non-finite loss.*step_00000002"):
        train(job, quiet=True)


def _cli(args, env_extra=None, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "linear_moe", "train", "--quiet", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _cli_args(tmp_path, data_dir, name, steps):
    args = []
    for k, v in TINY + [("train.max_steps", str(steps)), ("train.output_dir", str(tmp_path / "runs")),
                        ("data.cache_dir", str(data_dir)), ("data.max_chars", "200000"), ("model.vocab_size", "512"),
                        ("train.run_name", name), ("train.ckpt_interval", "3"), ("train.log_interval", "1")]:
        args += [f"--{k}", v]
    return args


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _wait_for(predicate, proc, timeout=180):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the trainer")
        time.sleep(0.05)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, data_dir):
    steps = 9
    straight = _cli(_cli_args(tmp_path, data_dir, "straight", steps))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    run = tmp_path / "runs" / "killed"
    proc = _cli(_cli_args(tmp_path, data_dir, "killed", steps))
    _wait_for(lambda: any(p.name == "step_00000003" for p in list_checkpoints(run)), proc)
    _wait_for(lambda: len(_losses(run)) >= 5 if (run / "metrics.jsonl").exists() else False, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert all(not p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir()) or list_checkpoints(run)
    resumed = _cli(["--resume", str(run)] + _cli_args(tmp_path, data_dir, "killed", steps))
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    want, got = _losses(tmp_path / "runs" / "straight"), _losses(run)
    assert set(got) == set(range(1, steps + 1))
    assert got == want  # bit-exact on CPU, including the steps run twice after the kill


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, data_dir):
    run = tmp_path / "runs" / "term"
    proc = _cli(_cli_args(tmp_path, data_dir, "term", 400))
    _wait_for(lambda: (run / "metrics.jsonl").exists() and len(_losses(run)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    last = list_checkpoints(run)[-1]
    step = int(last.name.split("_")[1])
    assert step == max(_losses(run)) and step < 400


def test_a_too_short_validation_split_fails_before_training_or_is_skipped(tmp_path, data_dir):
    """A validation split without one full window used to fail the final evaluation after the last step, before
    the final checkpoint was written (seen on the H100 at seq_len 32K). Now the run refuses to start, naming
    the ways out, or, with train.eval_batches=0, trains without evaluating."""
    from linear_moe.data import DataError
    from linear_moe.data.sources import open_source
    from linear_moe.train.data import open_training_data

    val_tokens = open_source(open_training_data(job_for(tmp_path, data_dir)).batcher.val_path).size
    job = job_for(tmp_path, data_dir, steps=2, **{"train.seq_len": val_tokens, "train.batch_size": 1})
    with pytest.raises(DataError, match=f"fewer than seq_len \\+ 1 = {val_tokens + 1}.*train.eval_batches=0"):
        train(job)
    assert not (tmp_path / "runs").exists()  # refused before the run directory, not after the training
    result = train(job_for(tmp_path, data_dir, steps=2, **{"train.seq_len": val_tokens, "train.batch_size": 1,
                                                             "train.eval_batches": 0}))
    assert result.step == 2 and result.checkpoint is not None and result.eval_loss != result.eval_loss  # nan


def test_out_of_memory_names_the_memory_knobs(tmp_path, data_dir, monkeypatch):
    """A step that runs out of device memory re-raises the same error type with the step and what to change:
    the MoE's kept rows, checkpointing, a smaller batch with accumulation, the dry run's estimate."""
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.32 GiB")

    monkeypatch.setattr(trainer_mod, "forward_backward", oom)
    job = job_for(tmp_path, data_dir, steps=3, **{"train.run_name": "oom", "train.batch_size": 4})
    with pytest.raises(torch.OutOfMemoryError) as err:
        train(job, quiet=True)
    msg = str(err.value)
    assert msg.startswith("step 1: CUDA out of memory. Tried to allocate 2.32 GiB")
    assert "--model.moe.expert_recompute true" in msg and "--train.activation_checkpointing selective" in msg
    assert "--train.batch_size 2 --train.grad_accum 2" in msg and "--dry-run" in msg


def test_out_of_memory_hint_names_the_moe_knob_only_for_models_with_moe_layers():
    from linear_moe.config import JobConfig

    job = JobConfig()
    assert "expert_recompute" in trainer_mod.out_of_memory_hint(job)
    job.model.ffn_pattern = "D" * job.model.num_layers  # dense MLPs only: the MoE knob changes nothing
    assert "expert_recompute" not in trainer_mod.out_of_memory_hint(job)
    assert "--train.activation_checkpointing" in trainer_mod.out_of_memory_hint(job)
