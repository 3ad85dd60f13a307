"""Import a Hugging Face checkpoint (Qwen2-MoE, Mixtral, DeepSeek-V2, Llama 3) as a Linear-MoE model.

Embeddings, norms, dense MLPs, routed / shared experts and routers are copied exactly. Layers that the
pattern keeps as softmax attention (``N``/``*``) take the source q/k/v/o projections; layers that become
linear mixers take them too wherever the shapes allow (linearization, as in Liger / LoLCATs; grouped
key/value heads are repeated to the mixer's head count) and start freshly otherwise.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model.causal_lm import LinearMoEForCausalLM
from ..model.config import ModelConfig
from .hf_config import model_config_from_hf
from .safetensors_io import atomic_directory, read_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class _Source:
    """The source tensors, with a record of which ones were used (the rest must be explainable)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors, self.used, self.missing, self.mismatched = tensors, set(), [], []

    def take(self, name: str) -> torch.Tensor | None:
        if name not in self.tensors:
            self.missing.append(name)
            return None
        self.used.add(name)
        return self.tensors[name]

    def has(self, name: str) -> bool:
        return name in self.tensors


def _expert_weights(src: _Source, prefix: str, num_experts: int) -> dict[str, torch.Tensor | None]:
    """Stacked ``[E, out, in]`` gate/up/down from per-expert tensors (HF's saved layout, Mixtral's w1/w3/w2
    included) or from transformers-5's fused ``experts.gate_up_proj [E, 2I, H]`` / ``experts.down_proj``."""
    fused = f"{prefix}.experts.gate_up_proj"
    if src.has(fused):
        gate_up, down = src.take(fused), src.take(f"{prefix}.experts.down_proj")
        inter = gate_up.shape[1] // 2
        return {"gate_proj": gate_up[:, :inter], "up_proj": gate_up[:, inter:], "down_proj": down}
    names = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
    if src.has(f"{prefix}.experts.0.w1.weight"):
        names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    out: dict[str, torch.Tensor | None] = {}
    for ours, theirs in names.items():
        parts = [src.take(f"{prefix}.experts.{e}.{theirs}.weight") for e in range(num_experts)]
        if any(p is None for p in parts):
            out[ours] = None
        elif len({p.shape for p in parts}) > 1:
            bad = next(e for e, p in enumerate(parts) if p.shape != parts[0].shape)
            src.mismatched.append(f"{prefix}.experts.{bad}.{theirs}.weight: {tuple(parts[bad].shape)} vs expert 0's {tuple(parts[0].shape)}")
            out[ours] = None
        else:
            out[ours] = torch.stack(parts)
    return out


def _same_shape(linear: nn.Module | None, w: torch.Tensor | None) -> bool:
    # kv heads are only repeated when the mixer's queries use the source's head layout
    return isinstance(linear, nn.Linear) and w is not None and linear.weight.shape == w.shape


def _linearized(mixer: nn.Module, src: _Source, prefix: str, head_dim: int, notes: list[str], layer: int) -> dict[str, torch.Tensor]:
    """Projection weights a linear mixer can take from the attention it replaces (shapes permitting)."""
    out, skipped, dropped = {}, [], []
    for proj in _PROJECTIONS:
        ours = getattr(mixer, proj, None)
        name = f"{prefix}.self_attn.{proj}.weight"
        if not isinstance(ours, nn.Linear) or not src.has(name):
            skipped.append(proj)
            continue
        w = src.take(name)
        if src.has(f"{prefix}.self_attn.{proj}.bias") and getattr(ours, "bias", None) is None:
            src.take(f"{prefix}.self_attn.{proj}.bias")
            dropped.append(proj)
        if w.shape != ours.weight.shape and proj in ("k_proj", "v_proj") and w.shape[1] == ours.weight.shape[1] \
                and ours.weight.shape[0] % w.shape[0] == 0 and w.shape[0] % head_dim == 0 \
                and _same_shape(getattr(mixer, "q_proj", None), src.tensors.get(f"{prefix}.self_attn.q_proj.weight")):
            # grouped kv heads -> one per query head; head h reads kv head h // groups
            groups = ours.weight.shape[0] // w.shape[0]
            w = w.view(-1, head_dim, w.shape[1]).repeat_interleave(groups, dim=0).reshape(-1, w.shape[1])
        if w.shape != ours.weight.shape:
            skipped.append(f"{proj} {tuple(w.shape)}->{tuple(ours.weight.shape)}")
            continue
        out[f"{proj}.weight"] = w
    if skipped:
        notes.append(f"layer {layer} ({type(mixer).__name__}): not initialised from attention: {', '.join(skipped)}")
    if dropped:
        notes.append(f"layer {layer} ({type(mixer).__name__}): the mixer has no bias; source biases of {', '.join(dropped)} dropped")
    return out


def map_hf_weights(cfg: ModelConfig, model: LinearMoEForCausalLM, tensors: dict[str, torch.Tensor],
                   notes: list[str]) -> dict[str, torch.Tensor]:
    """Our parameter name → source tensor for every parameter that comes from the checkpoint.

    Raises ValueError listing the first missing, unexpected or mis-shaped tensors.
    """
    src = _Source(tensors)
    state: dict[str, torch.Tensor | None] = {"embed.weight": src.take("model.embed_tokens.weight"),
                                             "norm.weight": src.take("model.norm.weight")}
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = src.take("lm_head.weight")
    elif src.has("lm_head.weight"):
        src.take("lm_head.weight")  # tied: the same values as the embedding
    deepseek = cfg.base_model == "deepseek_v2"
    upcycled = cfg.base_model == "llama3" and "E" in cfg.resolved_ffn_pattern()
    head_dim = cfg.attention.head_dim or cfg.hidden_size // cfg.attention.num_heads
    for i, block in enumerate(model.layers):
        p, ours = f"model.layers.{i}", f"layers.{i}"
        state[f"{ours}.mixer_norm.weight"] = src.take(f"{p}.input_layernorm.weight")
        state[f"{ours}.ffn_norm.weight"] = src.take(f"{p}.post_attention_layernorm.weight")
        if deepseek:
            src.used.update(n for n in src.tensors if n.startswith(f"{p}.self_attn."))  # MLA weights: no counterpart (see hf_config notes)
        elif block.mixer_name == "attention":
            for proj in _PROJECTIONS:
                state[f"{ours}.mixer.{proj}.weight"] = src.take(f"{p}.self_attn.{proj}.weight")
                if getattr(block.mixer, proj).bias is not None:
                    state[f"{ours}.mixer.{proj}.bias"] = src.take(f"{p}.self_attn.{proj}.bias")
        else:
            state.update({f"{ours}.mixer.{k}": v for k, v in _linearized(block.mixer, src, p, head_dim, notes, i).items()})
            src.used.update(n for n in src.tensors if n.startswith(f"{p}.self_attn."))  # the rest: noted as fresh
        if not block.is_moe:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                state[f"{ours}.ffn.{proj}.weight"] = src.take(f"{p}.mlp.{proj}.weight")
            continue
        if upcycled:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                w = src.take(f"{p}.mlp.{proj}.weight")
                state[f"{ours}.ffn.experts.{proj}"] = None if w is None else w.unsqueeze(0).repeat(cfg.moe.num_experts, 1, 1)
            continue
        mp = f"{p}.block_sparse_moe" if src.has(f"{p}.block_sparse_moe.gate.weight") else f"{p}.mlp"
        state[f"{ours}.ffn.router.weight"] = src.take(f"{mp}.gate.weight")
        for proj, w in _expert_weights(src, mp, cfg.moe.num_experts).items():
            state[f"{ours}.ffn.experts.{proj}"] = w
        if block.ffn.shared_expert is not None:
            shared = f"{mp}.shared_experts" if deepseek else f"{mp}.shared_expert"
            for proj in ("gate_proj", "up_proj", "down_proj"):
                state[f"{ours}.ffn.shared_expert.{proj}.weight"] = src.take(f"{shared}.{proj}.weight")
        if block.ffn.shared_expert_gate is not None:
            state[f"{ours}.ffn.shared_expert_gate.weight"] = src.take(f"{mp}.shared_expert_gate.weight")
    # rotary tables some exporters store are recomputed here
    src.used.update(n for n in src.tensors if n.endswith("rotary_emb.inv_freq"))
    _stack_gate_up(state)
    unexpected = sorted(set(src.tensors) - src.used)
    params = dict(model.state_dict())
    mismatched = src.mismatched + [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(params[k].shape)}"
                  for k, v in state.items() if v is not None and v.shape != params[k].shape]
    if src.missing or unexpected or mismatched:
        raise ValueError("the checkpoint does not match the model its config.json describes: "
                         f"missing {src.missing[:5]}{' ...' if len(src.missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}, "
                         f"mismatched shapes {mismatched[:5]}")
    return {k: v for k, v in state.items() if v is not None}


def _stack_gate_up(state: dict) -> None:
    """Our experts keep gate and up as one ``[E, 2H, C]`` parameter: stack each layer's pair in place (None,
    a tensor the checkpoint lacked, when either half is missing: the missing list already names it)."""
    for gate in [k for k in state if k.endswith(".experts.gate_proj")]:
        base = gate[:-len("gate_proj")]
        g, u = state.pop(gate), state.pop(base + "up_proj")
        state[base + "gate_up_proj"] = None if g is None or u is None else torch.cat([g, u], dim=1)


def storage_dtype(name: str) -> torch.dtype:
    """``float32`` | ``bfloat16`` | ``float16`` → the torch dtype; anything else raises."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype={name!r} is not one of: {', '.join(dtypes)}")
    return dtypes[name]


def build_from_hf(input_dir: str | Path, **config_options) -> tuple[LinearMoEForCausalLM, list[str], dict[str, Any]]:
    """The imported model (fp32, CPU), the notes, and the source config dict. Writes nothing."""
    d = Path(input_dir)
    if not d.is_dir():
        raise ValueError(f"input_dir {str(d)!r} does not exist or is not a directory")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{str(d)!r} has no config.json; expected a Hugging Face model directory")
    try:
        hf = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ValueError(f"{str(cfg_path)!r} is not valid JSON: {e}") from None
    cfg, notes = model_config_from_hf(hf, **config_options)
    tensors = read_weights(d)
    model = LinearMoEForCausalLM(cfg)
    state = map_hf_weights(cfg, model, tensors, notes)
    with torch.no_grad():
        params = model.state_dict()
        for k, v in state.items():
            params[k].copy_(v.to(params[k].dtype))
    return model, notes, hf


def convert_from_hf(input_dir: str | Path, output_dir: str | Path, *, mixer: str = "attention", layer_pattern: str = "",
                    mixer_options: dict[str, Any] | None = None, upcycle_experts: int = 0, upcycle_top_k: int = 2,
                    dtype: str = "float32", overwrite: bool = False) -> dict[str, Any]:
    """``linear-moe convert from-hf``: import a local HF checkpoint directory into a Linear-MoE checkpoint.

    Writes ``output_dir`` in the trainer's checkpoint layout (``model.safetensors``, ``config.toml``,
    ``state.json`` at step 0, tokenizer files when the source has them), atomically: on any error nothing
    is written. ``dtype`` (float32 | bfloat16 | float16) is how the weights are stored. Returns
    ``{"output_dir", "model_config", "notes"}``; notes list what is not an exact copy.
    """
    from ..config import JobConfig
    from ..train.checkpoint import model_state_for_saving
    from safetensors.torch import save_file

    torch_dtype = storage_dtype(dtype)
    model, notes, hf = build_from_hf(input_dir, mixer=mixer, layer_pattern=layer_pattern, mixer_options=mixer_options,
                                     upcycle_experts=upcycle_experts, upcycle_top_k=upcycle_top_k)
    job = JobConfig(model=model.config)
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        save_file(model_state_for_saving(model.to(torch_dtype)), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.toml").write_text(job.to_toml())
        for name in TOKENIZER_FILES:
            if (Path(input_dir) / name).is_file():
                shutil.copyfile(Path(input_dir) / name, tmp / name)
        source = {"path": str(Path(input_dir).resolve()), "model_type": hf.get("model_type"), "notes": notes}
        (tmp / "state.json").write_text(json.dumps({"step": 0, "tokens": 0, "imported_from": source}, indent=2))
    return {"output_dir": str(output_dir), "model_config": asdict(model.config), "notes": notes}
