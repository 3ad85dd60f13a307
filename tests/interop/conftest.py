"""Tiny random checkpoints of the four HF families (built with ``transformers``, nothing downloaded) and a
tiny Linear-MoE model directory with a tokenizer."""
from __future__ import annotations

import pytest
import torch

VOCAB, HIDDEN = 96, 32
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def hf_family_configs():
    import transformers as T

    return {
        # layer 0 dense (mlp_only_layers), shared expert with its sigmoid gate, un-normalised top-k
        "qwen2_moe": (T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig(
            **COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0], rope_theta=20000.0)),
        "mixtral": (T.MixtralForCausalLM, T.MixtralConfig(
            **COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
        # group-limited routing, routed scaling, 2 shared experts, first layer dense; MLA attention
        "deepseek_v2": (T.DeepseekV2ForCausalLM, T.DeepseekV2Config(
            **COMMON, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=2,
            num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4,
            qk_nope_head_dim=4, v_head_dim=8, n_group=2, topk_group=1, topk_method="group_limited_greedy",
            routed_scaling_factor=1.5)),
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(**COMMON, intermediate_size=48, rope_theta=500000.0)),
    }


def make_hf_checkpoint(family: str, path, generator: torch.Generator | None = None):
    """Save a random ``family`` model to ``path``; weights are redrawn at a scale where routing and
    attention are far from uniform (HF's 0.02 init would hide routing mistakes)."""
    cls, cfg = hf_family_configs()[family]
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """``{family: (directory, hf_model)}`` for qwen2_moe, mixtral, deepseek_v2, llama."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    return {fam: (root / fam, make_hf_checkpoint(fam, root / fam)) for fam in hf_family_configs()}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from linear_moe.data.tokenizer import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("tok")
    texts = ["the sun rises in the east; water left in a freezer turns into ice.",
             "a week has seven days and a year has twelve months.", "bees make honey, cows give milk."] * 20
    train_bpe_tokenizer(texts, 300, d / "tokenizer.json")
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """An exported Linear-MoE directory (GLA + attention, MoE) with the tokenizer: ``(dir, model)``."""
    from linear_moe import LinearMoEForCausalLM, ModelConfig
    from linear_moe.interop.hf import save_pretrained
    from linear_moe.layers.config import AttentionConfig
    from linear_moe.moe.config import MoEConfig
    from linear_moe.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(tokenizer_dir).vocab_size
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=2, mixer="gla", layer_pattern="LN",
                      attention=AttentionConfig(num_heads=2), moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=32))
    model = LinearMoEForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("lm") / "model"
    save_pretrained(model, d, tokenizer_dir=tokenizer_dir)
    return d, model
