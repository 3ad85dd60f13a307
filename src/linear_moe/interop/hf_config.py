"""Hugging Face ``config.json`` of Qwen2-MoE, Mixtral, DeepSeek-V2 and Llama (3) → our ``ModelConfig``.

Each family is a handful of field values (see ``model/presets.apply_family``); what cannot be expressed
(DeepSeek-V2's multi-head latent attention, Llama 3 rope scaling) is returned as a note, never hidden.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..layers.config import AttentionConfig, MixerConfig
from ..model.config import ModelConfig
from ..moe.config import MoEConfig

# HF model_type -> our base_model family label
SUPPORTED = {"qwen2_moe": "qwen2", "mixtral": "mixtral", "deepseek_v2": "deepseek_v2", "llama": "llama3"}


def _rope_theta(hf: dict[str, Any], notes: list[str]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        notes.append(f"rope_type={rope_type!r} (frequency scaling) is not implemented in ops/rotary.py: positions use "
                     f"plain RoPE with theta={theta}; logits differ from the source model")
    return float(theta)


def _attention(hf: dict[str, Any], family: str, notes: list[str]) -> AttentionConfig:
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if family == "deepseek_v2":
        # MLA has no q/k/v of this shape; our attention layers start fresh with plain multi-head shapes.
        head_dim = hf["hidden_size"] // heads
        if head_dim % 2:
            head_dim += 1
        kv = heads
    else:
        kv = hf.get("num_key_value_heads") or heads
    if family == "qwen2":
        bias = bool(hf.get("qkv_bias", True))
    else:
        bias = bool(hf.get("attention_bias", False))
        if bias:
            raise ValueError(f"attention_bias=True (a bias on o_proj as well as q/k/v) is not supported by "
                             f"layers/attention.py; the {family} checkpoint cannot be imported exactly")
    window = 0
    if family == "mixtral" and hf.get("sliding_window"):
        window = int(hf["sliding_window"])
    if family == "qwen2" and hf.get("use_sliding_window") and hf.get("sliding_window"):
        window = int(hf["sliding_window"])
        notes.append("Qwen2-MoE use_sliding_window applies to the layers past max_window_layers in HF; "
                     f"here every attention layer uses window {window}")
    return AttentionConfig(num_heads=heads, num_kv_heads=kv if kv != heads else 0,
                           head_dim=head_dim if head_dim * heads != hf["hidden_size"] else 0,
                           rope_theta=_rope_theta(hf, notes), qkv_bias=bias, sliding_window=window)


def _moe_and_ffn(hf: dict[str, Any], family: str, n: int, upcycle_experts: int, upcycle_top_k: int) -> tuple[MoEConfig, str]:
    aux = float(hf.get("router_aux_loss_coef", hf.get("aux_loss_alpha", 0.01)) or 0.0)
    if family == "qwen2":
        sparse = [hf.get("num_experts", 0) > 0 and i not in (hf.get("mlp_only_layers") or [])
                  and (i + 1) % hf.get("decoder_sparse_step", 1) == 0 for i in range(n)]
        shared = int(hf.get("shared_expert_intermediate_size", 0) or 0)
        moe = MoEConfig(num_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"],
                        expert_hidden_size=hf["moe_intermediate_size"], router="softmax",
                        norm_topk_prob=bool(hf.get("norm_topk_prob", False)), num_shared_experts=1 if shared else 0,
                        shared_expert_hidden_size=shared, shared_expert_gate=bool(shared), aux_loss_coef=aux)
    elif family == "mixtral":
        sparse = [True] * n
        moe = MoEConfig(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                        expert_hidden_size=hf["intermediate_size"], router="softmax", norm_topk_prob=True,
                        aux_loss_coef=aux)
    elif family == "deepseek_v2":
        k, freq = hf.get("first_k_dense_replace", 0), hf.get("moe_layer_freq", 1) or 1
        sparse = [hf.get("n_routed_experts") is not None and i >= k and i % freq == 0 for i in range(n)]
        grouped = hf.get("topk_method", "greedy") == "group_limited_greedy"
        moe = MoEConfig(num_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"],
                        expert_hidden_size=hf["moe_intermediate_size"], router="deepseek",
                        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                        n_group=hf.get("n_group", 1) if grouped else 1, topk_group=hf.get("topk_group", 1) if grouped else 1,
                        num_shared_experts=hf.get("n_shared_experts") or 0, first_k_dense=k, aux_loss_coef=aux,
                        seq_aux_loss=hf.get("seq_aux", False))
    else:  # llama: dense, or upcycled into identical experts
        if upcycle_experts:
            top_k = min(upcycle_top_k, upcycle_experts)
            # Identical experts with renormalised top-k weights sum to exactly the dense MLP output.
            moe = MoEConfig(num_experts=upcycle_experts, top_k=top_k, expert_hidden_size=hf["intermediate_size"],
                            router="softmax", norm_topk_prob=True)
            return moe, "E" * n
        return MoEConfig(), "D" * n
    return moe, "".join("E" if s else "D" for s in sparse)


def model_config_from_hf(hf: dict[str, Any], *, mixer: str = "attention", layer_pattern: str = "",
                         mixer_options: dict[str, Any] | None = None, upcycle_experts: int = 0,
                         upcycle_top_k: int = 2) -> tuple[ModelConfig, list[str]]:
    """Map an HF config dict to ``(ModelConfig, notes)``; notes say what is not reproduced exactly.

    ``mixer``/``layer_pattern`` choose the token mixers (``N``/``*`` keep softmax attention, ``L``/``M``
    use ``mixer``); the default keeps every layer as attention. ``upcycle_experts=N`` turns a dense
    Llama MLP into N identical experts (top ``upcycle_top_k``).
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"model_type={model_type!r} is not supported; choose a checkpoint of: {', '.join(SUPPORTED)}")
    family = SUPPORTED[model_type]
    notes: list[str] = []
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; the MLPs here are SwiGLU (silu)")
    if upcycle_experts < 0 or (upcycle_experts and family != "llama3"):
        raise ValueError(f"upcycle_experts={upcycle_experts} applies to dense (llama) checkpoints only and must be >= 0; "
                         f"this checkpoint is {model_type!r}")
    if upcycle_experts and not 1 <= upcycle_top_k:
        raise ValueError(f"upcycle_top_k={upcycle_top_k} must be >= 1")
    n = hf["num_hidden_layers"]
    attention = _attention(hf, family, notes)
    moe, ffn = _moe_and_ffn(hf, family, n, upcycle_experts, upcycle_top_k)
    if family == "deepseek_v2":
        notes.append("DeepSeek-V2 multi-head latent attention (MLA) has no counterpart here: embeddings, norms, "
                     "dense MLPs, experts, shared experts and routers are copied exactly; every token mixer starts "
                     "freshly initialised (train it before use)")
    if mixer != "attention" and not layer_pattern:
        layer_pattern = "L" * n
    options = dict(mixer_options or {})
    options.setdefault("num_heads", attention.num_heads)
    known = {f.name for f in dataclasses.fields(MixerConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown mixer option(s) {unknown}; known: {', '.join(sorted(known))}")
    cfg = ModelConfig(
        base_model=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=n,
        mixer=mixer, layer_pattern=layer_pattern, ffn_pattern=ffn, intermediate_size=hf.get("intermediate_size", 0) or 0,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        attention=attention, mixer_options=MixerConfig(**options), moe=moe)
    return cfg.validate(), notes
