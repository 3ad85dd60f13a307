"""The trainer on a tiny model and the tiny corpus slice: learning, checkpoints, exact resume."""
import json
import math

import pytest
import torch

from linear_moe.config import build_job_config
from linear_moe.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, resolve_checkpoint
from linear_moe.train.optim import lr_at
from linear_moe.train.trainer import train

TINY = [("model.hidden_size", "32"), ("model.num_layers", "2"), ("model.layer_pattern", "LN"), ("model.intermediate_size", "64"),
        ("model.moe.num_experts", "4"), ("model.moe.expert_hidden_size", "32"), ("model.attention.num_heads", "2"),
        ("train.batch_size", "4"), ("train.seq_len", "32"), ("train.eval_batches", "2"), ("train.eval_interval", "0"),
        ("train.log_interval", "2"), ("train.warmup_steps", "2"), ("train.sample_tokens", "8")]


def job_for(tmp_path, data_dir, steps=8, **extra):
    overrides = TINY + [("train.max_steps", str(steps)), ("train.output_dir", str(tmp_path / "runs")),
                        ("data.cache_dir", str(data_dir)), ("data.max_chars", "200000"), ("model.vocab_size", "512")]
    overrides += [(k, str(v)) for k, v in extra.items()]
    return build_job_config(overrides=overrides)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    job = build_job_config(overrides=[("train.lr", "1.0"), ("train.warmup_steps", "10"), ("train.min_lr_ratio", "0.1")])
    t = job.train
    assert lr_at(0, t, 100) == pytest.approx(0.1)
    assert lr_at(9, t, 100) == pytest.approx(1.0)
    assert lr_at(10, t, 100) == pytest.approx(1.0)
    assert lr_at(55, t, 100) == pytest.approx(0.55, abs=1e-6)
    assert lr_at(100, t, 100) == pytest.approx(0.1)


def test_training_writes_metrics_checkpoint_and_sample(tmp_path, data_dir):
    job = job_for(tmp_path, data_dir, steps=6, **{"train.run_name": "r1"})
    result = train(job, quiet=True)
    run = tmp_path / "runs" / "r1"
    assert result.run_dir == run and result.step == 6
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert any("eval_loss" in r for r in rows)
    assert list_checkpoints(run)[-1].name == "step_00000006"
    assert (run / "config.toml").is_file() and (result.checkpoint / "tokenizer.json").is_file()
    assert isinstance(result.sample, str) and len(result.sample) > len(job.train.sample_prompt)
    assert (run / "tensorboard").is_dir()


def test_resume_continues_with_the_same_losses(tmp_path, data_dir):
    straight = train(job_for(tmp_path, data_dir, steps=8, **{"train.run_name": "straight"}), quiet=True)
    job = job_for(tmp_path, data_dir, steps=8, **{"train.run_name": "broken", "train.ckpt_interval": "4"})
    first = train(job, quiet=True, stop_after=5)  # "killed" after step 5; the last checkpoint is step 4
    assert first.step == 5
    ckpt = resolve_checkpoint(first.run_dir / "checkpoints" / "step_00000004")
    resumed = train(job, resume=ckpt, quiet=True)
    assert resumed.step == 8
    assert straight.losses[4:] == resumed.losses, (straight.losses, first.losses, resumed.losses)
    assert straight.losses[:5] == first.losses


def test_corrupt_or_missing_checkpoints_are_rejected(tmp_path, data_dir):
    result = train(job_for(tmp_path, data_dir, steps=2, **{"train.run_name": "c"}), quiet=True)
    from linear_moe.model.causal_lm import LinearMoEForCausalLM

    model = LinearMoEForCausalLM(job_for(tmp_path, data_dir).model)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", model)
    weights = result.checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(result.checkpoint, model)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)


def test_a_failed_save_leaves_no_half_checkpoint(tmp_path, monkeypatch, data_dir):
    from linear_moe.train import checkpoint as ck

    job = job_for(tmp_path, data_dir, steps=2, **{"train.run_name": "f"})
    train(job, quiet=True)
    run = tmp_path / "runs" / "f"
    before = [p.name for p in list_checkpoints(run)]

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(run, 3, torch.nn.Linear(2, 2), None, {}, "", keep_last=5)
    assert [p.name for p in list_checkpoints(run)] == before


def test_generate_from_a_checkpoint_via_the_cli(tmp_path, data_dir, capsys):
    from linear_moe.cli import main

    result = train(job_for(tmp_path, data_dir, steps=2, **{"train.run_name": "g"}), quiet=True)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(result.run_dir), "--prompt", "And the", "--max-new-tokens", "6",
                 "--temperature", "0.9", "--top-p", "0.9", "--num-samples", "2"]) == 0
    captured = capsys.readouterr()
    samples = [s.strip() for s in captured.out.split("---") if s.strip()]
    assert len(samples) == 2 and all(s.startswith("And the") for s in samples)
    assert "tokens/s" in captured.err


@pytest.mark.parametrize("mixer, pattern", [("attention", "NN"), ("gated_deltanet", "LN")])
def test_bf16_mixed_precision_trains(tmp_path, data_dir, mixer, pattern):
    """bf16 autocast with fp32 master weights (the GPU default), exercised on the CPU."""
    result = train(job_for(tmp_path, data_dir, steps=4, **{"train.run_name": f"bf16-{mixer}", "train.precision": "bf16",
                                                           "model.mixer": mixer, "model.layer_pattern": pattern}), quiet=True)
    assert result.step == 4 and all(math.isfinite(x) for x in result.losses)
    assert math.isfinite(result.eval_loss)


def test_cast_weights_once_trains_exactly_like_casting_per_use(tmp_path, data_dir):
    """train.cast_weights_once reuses one bf16 copy of the expert weights across micro-batches; the losses
    must be bit-identical to casting at every use (bf16 autocast on the CPU, two micro-batches per step)."""
    runs = {}
    for once in (False, True):
        runs[once] = train(job_for(tmp_path, data_dir, steps=3, **{"train.run_name": f"once-{once}", "train.precision": "bf16",
                                                                    "train.grad_accum": 2, "train.cast_weights_once": once}),
                           quiet=True).losses
    assert len(runs[True]) == 3 and runs[True] == runs[False]


def test_compiled_blocks_train_like_eager(tmp_path, data_dir):
    """--train.compile true (torch.compile per block, incl. the MoE's grouped GEMMs) gives the eager losses.
    The aot_eager backend traces forward and backward with fake tensors, as inductor does, without spending
    minutes generating CPU code."""
    from linear_moe.moe import experts

    experts._probe_cache.clear()  # as in a fresh process: the first grouped-GEMM support probe runs while tracing
    compiled = train(job_for(tmp_path, data_dir, steps=2, **{"train.run_name": "compiled", "train.compile": "true",
                                                               "train.compile_backend": "aot_eager"}), quiet=True)
    eager = train(job_for(tmp_path, data_dir, steps=2, **{"train.run_name": "eager"}), quiet=True)
    for a, b in zip(compiled.losses, eager.losses):
        assert abs(a - b) <= 1e-4 * abs(b), (compiled.losses, eager.losses)
