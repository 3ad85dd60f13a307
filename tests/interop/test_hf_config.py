"""HF config.json → ModelConfig, field by field, without weights."""
from __future__ import annotations

import pytest

from linear_moe.interop.hf_config import model_config_from_hf

BASE = dict(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, rms_norm_eps=1e-5, hidden_act="silu")


def test_llama3_rope_scaling_is_reported_not_hidden():
    hf = dict(BASE, model_type="llama", rope_theta=500000.0,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192})
    cfg, notes = model_config_from_hf(hf)
    assert cfg.base_model == "llama3" and cfg.resolved_ffn_pattern() == "DDDD"
    assert cfg.attention.rope_theta == 500000.0 and cfg.attention.num_kv_heads == 2 and cfg.norm_eps == 1e-5
    assert len(notes) == 1 and "rope_type='llama3'" in notes[0]


def test_qwen2_moe_sparse_step_and_sliding_window_fields():
    hf = dict(BASE, model_type="qwen2_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
              shared_expert_intermediate_size=0, decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True,
              rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    cfg, notes = model_config_from_hf(hf, mixer="gated_deltanet", layer_pattern="LLLN")
    assert cfg.resolved_ffn_pattern() == "DEDD" and cfg.attention.qkv_bias and cfg.attention.rope_theta == 1e6
    assert cfg.moe.num_shared_experts == 0 and not cfg.moe.shared_expert_gate and cfg.moe.norm_topk_prob
    assert cfg.mixer == "gated_deltanet" and cfg.mixer_options.num_heads == 4 and notes == []


def test_deepseek_greedy_routing_and_dense_prefix():
    hf = dict(BASE, model_type="deepseek_v2", n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
              n_shared_experts=2, first_k_dense_replace=2, topk_method="greedy", n_group=4, topk_group=2,
              routed_scaling_factor=16.0)
    cfg, notes = model_config_from_hf(hf, mixer="gla")
    assert cfg.resolved_ffn_pattern() == "DDEE" and cfg.resolved_layer_pattern() == "LLLL"
    assert (cfg.moe.n_group, cfg.moe.topk_group, cfg.moe.routed_scaling_factor) == (1, 1, 16.0)
    assert cfg.moe.shared_hidden_size() == 32 and any("MLA" in n for n in notes)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama", "attention_bias": True}, "attention_bias=True"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"model_type": "bert"}, "model_type='bert' is not supported"),
])
def test_unsupported_configs(change, message):
    with pytest.raises(ValueError, match=message):
        model_config_from_hf(dict(BASE, **change))
