"""Batched generation of prompts of different lengths: each row equals generating its prompt alone."""
import dataclasses

import pytest
import torch

from linear_moe.layers.config import AttentionConfig, MixerConfig
from linear_moe.model.causal_lm import LinearMoEForCausalLM
from linear_moe.model.config import ModelConfig
from linear_moe.model.generation import generate
from linear_moe.moe.config import MoEConfig


def tiny_config(**kw) -> ModelConfig:
    # A larger init and untied embeddings: at the default init a random model mostly echoes its input
    # token, and rows would agree even when their states were wrong (e.g. naive left padding).
    base = dict(vocab_size=97, hidden_size=32, num_layers=2, mixer="attention", intermediate_size=48,
                initializer_range=0.3, tie_embeddings=False, attention=AttentionConfig(num_heads=2), moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=24))
    base.update(kw)
    return ModelConfig(**base)


def _model(seed: int, **kw) -> LinearMoEForCausalLM:
    torch.manual_seed(seed)
    return LinearMoEForCausalLM(tiny_config(**kw)).eval()


def _prompts(lengths, vocab=97):
    return [torch.randint(0, vocab, (n,)) for n in lengths]


def _alone(model, prompt, new, **kw) -> torch.Tensor:
    return model.generate(prompt[None], new, **kw)[0]


CASES = {
    "gdn+attention": dict(mixer="gated_deltanet", layer_pattern="LN"),
    # retention keeps a per-row position offset tensor; mamba2 a conv state; both beside a GQA window cache
    "retention+window": dict(mixer="retention", layer_pattern="LN",
                             attention=AttentionConfig(num_heads=4, num_kv_heads=2, sliding_window=4)),
    "mamba2": dict(mixer="mamba2", layer_pattern="LL"),
    # a softmax-attention cache nested inside a linear mixer's state
    "based+window branch": dict(mixer="based", layer_pattern="LL", mixer_options=MixerConfig(based_window=3)),
    "attention": dict(mixer="attention", layer_pattern="NN"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ragged_batch_equals_each_prompt_alone(case):
    model = _model(11, **CASES[case])
    prompts = _prompts([3, 7, 1, 5])
    batched = generate(model, prompts, 6)
    assert len(batched) == len(prompts)
    for prompt, row in zip(prompts, batched):
        alone = _alone(model, prompt, 6)
        assert torch.equal(row, alone), (prompt.tolist(), row.tolist(), alone.tolist())


def test_naive_left_padding_would_be_caught():
    """The check above is sensitive: feeding pad tokens through the mixers changes the rows."""
    model = _model(11, **CASES["gdn+attention"])
    prompts = _prompts([3, 7, 1, 5])
    padded = torch.stack([torch.cat([torch.zeros(7 - len(p), dtype=torch.long), p]) for p in prompts])
    naive = generate(model, padded, 6)
    wrong = [not torch.equal(naive[i, 7:], _alone(model, p, 6)[len(p):]) for i, p in enumerate(prompts)]
    assert sum(wrong) >= 2


def test_ragged_rows_stop_at_their_own_eos():
    model = _model(12, mixer="gated_deltanet", layer_pattern="LN")
    prompts = _prompts([4, 2, 6])
    first = _alone(model, prompts[0], 5)
    eos = int(first[4 + 1])  # the second token row 0 generates: row 0 stops after two new tokens
    batched = generate(model, prompts, 5, eos_id=eos)
    for prompt, row in zip(prompts, batched):
        assert torch.equal(row, _alone(model, prompt, 5, eos_id=eos))
        new = row[len(prompt):].tolist()
        assert eos not in new[:-1]  # nothing follows a row's first eos
    assert len(batched[0]) <= 4 + 2


@pytest.mark.parametrize("check_every", [1, 3, 8])
def test_sparse_stop_checks_give_the_same_tokens(check_every):
    model = _model(13, mixer="gated_deltanet", layer_pattern="LN")
    x = torch.randint(0, 97, (3, 4))
    reference = generate(model, x, 9, stop_check_every=1)
    eos = int(reference[0, 4 + 2])
    want = generate(model, x, 9, eos_id=eos, stop_check_every=1)
    got = generate(model, x, 9, eos_id=eos, stop_check_every=check_every)
    assert torch.equal(got, want)
    # the tensor form fills finished rows with eos and stops once all rows finished
    done_at = [int((r[4:] == eos).nonzero()[0]) if (r[4:] == eos).any() else 9 for r in want]
    assert want.shape[1] == 4 + min(9, max(d + 1 for d in done_at))


def test_equal_length_prompt_list_is_one_batch_and_matches_the_tensor_form():
    model = _model(14, mixer="gla", layer_pattern="LN")
    x = torch.randint(0, 97, (2, 5))
    as_list = generate(model, [row.tolist() for row in x], 4)
    assert torch.equal(torch.stack(as_list), generate(model, x, 4))


def test_model_generate_accepts_a_list_and_restores_training_mode():
    model = _model(15, mixer="gated_deltanet", layer_pattern="LN").train()
    prompts = _prompts([2, 3])
    out = model.generate(prompts, 3)
    assert [len(r) for r in out] == [5, 6] and model.training
    for m in model.modules():  # the per-row attention forward is gone after generation
        assert "forward" not in vars(m)


@pytest.mark.parametrize("bad, match", [([], "empty list"), ([[1, 2], []], "prompt 1"),
                                        ([[[1, 2]]], "prompt 0")])
def test_bad_prompts_are_refused(bad, match):
    model = _model(16)
    with pytest.raises(ValueError, match=match):
        generate(model, bad, 2)


def test_bad_generation_options_are_refused():
    model = _model(17)
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="stop_check_every=0"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 2, stop_check_every=0)


def test_zero_new_tokens_returns_the_prompts():
    model = _model(18)
    prompts = _prompts([2, 4])
    assert all(torch.equal(a, b) for a, b in zip(generate(model, prompts, 0), prompts))
    assert generate(model, torch.ones(2, 3, dtype=torch.long), 0).shape == (2, 3)
