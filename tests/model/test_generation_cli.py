"""`linear-moe generate` with several prompts: batched, each completion as if generated alone."""
import pytest
import torch

from linear_moe.cli import main
from linear_moe.config import build_job_config
from linear_moe.data import load_tokenizer
from linear_moe.model.causal_lm import LinearMoEForCausalLM
from linear_moe.train.checkpoint import load_checkpoint, resolve_checkpoint
from linear_moe.train.trainer import train

TINY = [("model.hidden_size", "32"), ("model.num_layers", "2"), ("model.layer_pattern", "LN"),
        ("model.intermediate_size", "64"), ("model.moe.num_experts", "4"), ("model.moe.expert_hidden_size", "32"),
        ("model.attention.num_heads", "2"), ("model.vocab_size", "512"), ("train.batch_size", "4"),
        ("train.seq_len", "32"), ("train.eval_batches", "1"), ("train.eval_interval", "0"), ("train.log_interval", "2"),
        ("train.warmup_steps", "1"), ("train.sample_tokens", "0"), ("train.max_steps", "2"), ("data.max_chars", "200000")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen-cli")
    job = build_job_config(overrides=TINY + [("train.output_dir", str(tmp / "runs")), ("data.cache_dir", str(tmp / "data")),
                                             ("train.run_name", "g")])
    return train(job, quiet=True).run_dir


def test_several_prompts_print_each_completion_greedy_as_alone(run_dir, tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("Once upon a time there was\n\nThe\n")
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "And the king said", "--prompt-file",
                 str(prompt_file), "--max-new-tokens", "5", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    completions = [s.strip("\n") for s in captured.out.split("---\n") if s.strip()]
    assert len(completions) == 3
    assert "3 sequences" in captured.err and "tokens/s" in captured.err
    ckpt = resolve_checkpoint(str(run_dir))
    model = LinearMoEForCausalLM(build_job_config(config_file=ckpt / "config.toml").model)
    load_checkpoint(ckpt, model)
    tok = load_tokenizer(ckpt / "tokenizer.json")
    for text, printed in zip(["And the king said", "Once upon a time there was", "The"], completions):
        ids = torch.tensor([tok.encode(text)])
        alone = model.generate(ids, 5, eos_id=tok.eos_id)[0].tolist()
        assert printed == tok.decode(alone)


def test_unreadable_prompt_file_is_one_clear_error(run_dir, capsys):
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt-file", "/no/such/prompts.txt"]) == 2
    assert "--prompt-file '/no/such/prompts.txt' cannot be read" in capsys.readouterr().err
