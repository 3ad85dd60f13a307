"""Named model configurations and the base-model families as config flavours.

A family is a set of field values (litgpt-style), never a subclass: Qwen2-MoE, DeepSeek-V2-MoE,
Mixtral and Llama3 differ in routing, shared experts, dense layers, biases and rope base.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..layers.config import AttentionConfig
from ..moe.config import MoEConfig
from .config import FAMILIES, ModelConfig


def _tiny() -> ModelConfig:
    # About a second per step of 16 x 256 tokens on 2 CPU cores; big enough to learn word shapes from a few
    # MB of text. A Linear-MoE hybrid: three Gated DeltaNet layers, then one softmax-attention layer.
    return ModelConfig(
        base_model="qwen2", vocab_size=4096, hidden_size=192, num_layers=4, mixer="gated_deltanet", layer_pattern="LLLN",
        intermediate_size=512, tie_embeddings=True, max_position_embeddings=2048,
        attention=AttentionConfig(num_heads=4, rope_theta=10000.0),
        moe=MoEConfig(num_experts=8, top_k=2, expert_hidden_size=256, aux_loss_coef=0.01),
    )


def _a03b_2b() -> ModelConfig:
    # The original Linear-MoE "A0.3B-2B" Qwen2 example: 12 layers, hidden 1024, 8 heads, 64 experts top-8,
    # expert width 896, no shared expert.
    return ModelConfig(
        base_model="qwen2", vocab_size=151936, hidden_size=1024, num_layers=12, mixer="attention",
        intermediate_size=2816, tie_embeddings=False, max_position_embeddings=131072,
        attention=AttentionConfig(num_heads=8, rope_theta=10000.0, qkv_bias=True),
        moe=MoEConfig(num_experts=64, top_k=8, expert_hidden_size=896, norm_topk_prob=False),
    )


def _a1b_7b() -> ModelConfig:
    # The original "A1B" Qwen2 setting: 16 layers, hidden 2048, 16 heads, 64 experts top-8, expert width 1024.
    return ModelConfig(
        base_model="qwen2", vocab_size=151936, hidden_size=2048, num_layers=16, mixer="attention",
        intermediate_size=5632, tie_embeddings=False, max_position_embeddings=131072,
        attention=AttentionConfig(num_heads=16, rope_theta=10000.0, qkv_bias=True),
        moe=MoEConfig(num_experts=64, top_k=8, expert_hidden_size=1024, norm_topk_prob=False),
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {"tiny": _tiny, "A0.3B-2B": _a03b_2b, "A1B-7B": _a1b_7b}


def apply_family(cfg: ModelConfig, family: str) -> ModelConfig:
    """Return ``cfg`` with the fields that make it a ``family`` model (sizes are kept)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown base_model {family!r}; choose one of: {', '.join(FAMILIES)}")
    att, moe = cfg.attention, cfg.moe
    if family == "qwen2":
        att = dataclasses.replace(att, qkv_bias=True)
        moe = dataclasses.replace(moe, router="softmax", norm_topk_prob=False)
    elif family == "deepseek_v2":
        att = dataclasses.replace(att, qkv_bias=False)
        moe = dataclasses.replace(moe, router="deepseek", norm_topk_prob=False, num_shared_experts=max(moe.num_shared_experts, 2),
                                  first_k_dense=max(moe.first_k_dense, 1), shared_expert_gate=False)
    elif family == "mixtral":
        att = dataclasses.replace(att, qkv_bias=False, rope_theta=1e6)
        moe = dataclasses.replace(moe, router="softmax", num_experts=8, top_k=2, norm_topk_prob=True,
                                  num_shared_experts=0, shared_expert_gate=False)
    elif family == "llama3":
        kv = att.num_heads // 4 if att.num_heads % 4 == 0 else att.num_heads
        att = dataclasses.replace(att, qkv_bias=False, rope_theta=500000.0, num_kv_heads=kv)
        return dataclasses.replace(cfg, base_model=family, attention=att, ffn_pattern="D" * cfg.num_layers)
    return dataclasses.replace(cfg, base_model=family, attention=att, moe=moe)


def model_preset(name: str, base_model: str | None = None, **overrides) -> ModelConfig:
    """Build preset ``name``, optionally as another family, then set top-level fields from ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    if base_model is not None and base_model != cfg.base_model:
        cfg = apply_family(cfg, base_model)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; known: {', '.join(sorted(names))}")
    return dataclasses.replace(cfg, **overrides)
