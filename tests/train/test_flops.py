"""MFU's FLOP count against a hand count, for a dense-attention model and an MoE model with a window."""
import pytest
import torch

from linear_moe.layers.config import AttentionConfig
from linear_moe.model.causal_lm import LinearMoEForCausalLM
from linear_moe.model.config import ModelConfig
from linear_moe.moe.config import MoEConfig
from linear_moe.parallel.activation_checkpoint import apply_activation_checkpointing
from linear_moe.train.flops import (matmul_flops_per_token, recurrent_state_size, sequence_flops_per_token,
                                    training_flops_per_token)


def test_dense_attention_model_by_hand():
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, mixer="attention", intermediate_size=48,
                      ffn_pattern="DD", attention=AttentionConfig(num_heads=2), tie_embeddings=True)
    model = LinearMoEForCausalLM(cfg)
    per_layer = 4 * 32 * 32 + 3 * 32 * 48           # q, k, v, o + SwiGLU gate/up/down
    head = 97 * 32                                   # tied LM head counts once
    assert matmul_flops_per_token(model) == 2 * (2 * per_layer + head)
    T = 16
    attn = 2 * 4 * 2 * 16 * (T + 1) / 2              # layers * 4 * heads * head_dim * mean causal context
    assert sequence_flops_per_token(model, T) == attn
    assert training_flops_per_token(model, T) == 3 * (2 * (2 * per_layer + head) + attn)


def test_moe_model_with_window_and_gqa_by_hand():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, mixer="attention", tie_embeddings=False,
                      attention=AttentionConfig(num_heads=4, num_kv_heads=2, sliding_window=5),
                      moe=MoEConfig(num_experts=8, top_k=2, expert_hidden_size=16, num_shared_experts=1,
                                    shared_expert_hidden_size=24, shared_expert_gate=True))
    model = LinearMoEForCausalLM(cfg)
    attn_proj = 32 * 32 + 2 * (32 * 16) + 32 * 32    # q (4x8), k and v (2x8 each), o
    routed = 8 * 3 * 32 * 16 * 2 / 8                 # top-2 of 8 experts
    shared = 3 * 32 * 24 + 32                         # shared SwiGLU + its sigmoid gate
    router = 8 * 32
    head = 64 * 32
    assert matmul_flops_per_token(model) == pytest.approx(2 * (attn_proj + routed + shared + router + head))
    assert sequence_flops_per_token(model, 100) == 4 * 4 * 8 * 5  # the window (5) is shorter than 50.5


@pytest.mark.parametrize("mixer", ["gla", "gated_deltanet", "retention"])
def test_linear_mixers_cost_is_flat_in_sequence_length(mixer):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, mixer=mixer, ffn_pattern="D",
                      attention=AttentionConfig(num_heads=2))
    model = LinearMoEForCausalLM(cfg)
    size = recurrent_state_size(model.layers[0].mixer, 32)
    assert size > 0
    assert sequence_flops_per_token(model, 128) == sequence_flops_per_token(model, 65536) == 4 * size


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, mixer="attention",
                      attention=AttentionConfig(num_heads=2), moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16))
    torch.manual_seed(0)
    plain = LinearMoEForCausalLM(cfg)
    torch.manual_seed(0)
    ckpt = apply_activation_checkpointing(LinearMoEForCausalLM(cfg), mode)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in ckpt.named_parameters()]
    x = torch.randint(0, 64, (2, 12))
    for m in (plain, ckpt):
        m(x, labels=x).loss.backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="'sometimes' is not one of none, selective, full"):
        apply_activation_checkpointing(plain, "sometimes")
