"""Export a Linear-MoE checkpoint as a Hugging Face-style directory and load either form back.

An exported directory holds ``config.json`` (``model_type: "linear_moe"``, our ``ModelConfig`` as plain
fields), ``model.safetensors`` (or shards + ``model.safetensors.index.json``), the tokenizer files and a
generated ``README.md``. Loading never unpickles: weights are read from safetensors only.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..layers.config import AttentionConfig, MixerConfig
from ..model.causal_lm import LinearMoEForCausalLM
from ..model.config import ModelConfig
from ..moe.config import MoEConfig
from .hf_import import TOKENIZER_FILES
from .safetensors_io import atomic_directory, read_weights, write_sharded

MODEL_TYPE = "linear_moe"
_NESTED = {"attention": AttentionConfig, "mixer_options": MixerConfig, "moe": MoEConfig}


# ---- config ------------------------------------------------------------------------------------------

def config_to_hf_dict(cfg: ModelConfig, **extra) -> dict[str, Any]:
    """``config.json`` contents: our fields as they are, plus the HF names generic tools look for."""
    d = dataclasses.asdict(cfg)
    d.update(model_type=MODEL_TYPE, architectures=["LinearMoEForCausalLM"], num_hidden_layers=cfg.num_layers,
             num_attention_heads=cfg.attention.num_heads, tie_word_embeddings=cfg.tie_embeddings,
             rms_norm_eps=cfg.norm_eps, **extra)
    return d


def config_from_hf_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of :func:`config_to_hf_dict` (the HF alias keys are ignored)."""
    if d.get("model_type") != MODEL_TYPE:
        raise ValueError(f"config.json has model_type={d.get('model_type')!r}, not {MODEL_TYPE!r}; "
                         "import other families with convert_from_hf")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    kwargs = {k: v for k, v in d.items() if k in fields}
    for name, cls in _NESTED.items():
        if name in kwargs:
            known = {f.name for f in dataclasses.fields(cls)}
            kwargs[name] = cls(**{k: v for k, v in kwargs[name].items() if k in known})
    return ModelConfig(**kwargs).validate()


# ---- locating a model --------------------------------------------------------------------------------

def _checkpoint_dir(path: Path) -> Path:
    from ..train.checkpoint import resolve_checkpoint

    return resolve_checkpoint(path)


def load_model_config(path: str | Path) -> tuple[ModelConfig, Path]:
    """``(config, directory holding the weights)`` for an exported dir, a checkpoint dir or a run dir."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"model path {str(p)!r} does not exist")
    if (p / "config.json").is_file() and not (p / "config.toml").is_file():
        try:
            d = json.loads((p / "config.json").read_text())
        except ValueError as e:
            raise ValueError(f"{str(p / 'config.json')!r} is not valid JSON: {e}") from None
        return config_from_hf_dict(d), p
    from ..config import build_job_config

    ckpt = _checkpoint_dir(p)
    toml = ckpt / "config.toml" if (ckpt / "config.toml").is_file() else ckpt.parent.parent / "config.toml"
    if not toml.is_file():
        raise ValueError(f"{str(ckpt)!r} has no config.toml (nor does its run directory)")
    return build_job_config(config_file=toml).model.validate(), ckpt


def find_tokenizer_dir(path: str | Path) -> Path | None:
    """The directory holding ``tokenizer.json`` for a model path (checkpoint, its run dir, or export)."""
    p = Path(path)
    candidates = [p]
    if not (p / "tokenizer.json").is_file() and not (p / "config.json").is_file():
        try:
            ckpt = _checkpoint_dir(p)
            candidates += [ckpt, ckpt.parent.parent]
        except ValueError:
            pass
    return next((c for c in candidates if (c / "tokenizer.json").is_file()), None)


def from_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    trust_dcp: bool = False) -> LinearMoEForCausalLM:
    """Load a model from an exported directory (``convert_to_hf``), a checkpoint directory or a run
    directory (its newest checkpoint), in eval mode. Weights come from safetensors; a sharded training
    checkpoint (``dcp/``) loads only with ``trust_dcp=True``, because torch.distributed.checkpoint
    stores its metadata as a pickle (fine for checkpoints you wrote, never for downloaded ones)."""
    cfg, wdir = load_model_config(path)
    model = LinearMoEForCausalLM(cfg)
    if (wdir / "dcp").is_dir() and not any(wdir.glob("*.safetensors")):
        from ..train.checkpoint import load_checkpoint

        if not trust_dcp:
            raise ValueError(f"{str(wdir)!r} is a sharded (dcp/) checkpoint whose metadata is a pickle; load it with "
                             "trust_dcp=True if you wrote it, or export it first with convert_to_hf")

        load_checkpoint(wdir, model)
    else:
        tensors = read_weights(wdir)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
        missing = [m for m in missing if m not in tied]
        if missing or unexpected:
            raise ValueError(f"weights in {str(wdir)!r} do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


# ---- export ------------------------------------------------------------------------------------------

def _model_card(cfg: ModelConfig, model: LinearMoEForCausalLM, tokens: int | None, source: str) -> str:
    pattern = cfg.resolved_layer_pattern()
    ffn = cfg.resolved_ffn_pattern()
    lines = [
        "---", "library_name: linear-moe", "tags: [linear-moe, mixture-of-experts, linear-attention]", "---", "",
        f"# Linear-MoE model ({cfg.base_model} family, `{cfg.mixer}` mixer)", "",
        "A decoder-only Linear-MoE language model: each block is a token mixer (linear attention / SSM / "
        "linear RNN, or softmax attention) followed by a channel mixer (Mixture-of-Experts or dense SwiGLU).", "",
        "| | |", "|---|---|",
        f"| parameters | {model.num_parameters():,} ({model.num_active_parameters():,} active per token) |",
        f"| layers | {cfg.num_layers} (hidden {cfg.hidden_size}, vocabulary {cfg.vocab_size}) |",
        f"| token mixers | `{pattern}` (L/M = `{cfg.mixer}`, N/* = softmax attention, {cfg.attention.num_heads} heads) |",
        f"| channel mixers | `{ffn}` (E = MoE, D = dense SwiGLU width {cfg.dense_intermediate_size()}) |",
    ]
    if "E" in ffn:
        m = cfg.moe
        lines.append(f"| experts | {m.num_experts} routed, top-{m.top_k}, width {m.expert_hidden_size}, "
                     f"{m.num_shared_experts} shared, router `{m.router}` |")
    lines.append(f"| training tokens | {tokens:,} |" if tokens is not None else "| training tokens | unknown |")
    lines += ["", f"Exported from `{source}`.", "", "```python", "import linear_moe",
              "model = linear_moe.from_pretrained(\"path/to/this/directory\")", "```", ""]
    return "\n".join(lines)


def save_pretrained(model: LinearMoEForCausalLM, output_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
                    tokens: int | None = None, source: str = "linear-moe", max_shard_size: int | str = "2GB",
                    overwrite: bool = False) -> list[str]:
    """Write ``model`` (and the tokenizer files in ``tokenizer_dir``) as an HF-style directory, atomically.
    Returns the names of the files written."""
    from ..train.checkpoint import model_state_for_saving

    cfg = model.config
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    extra = {}
    if tok_dir is not None:
        from ..data.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_dir)
        extra = {"eos_token_id": tok.eos_id, "bos_token_id": tok.bos_id, "pad_token_id": tok.pad_id}
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        files = write_sharded(model_state_for_saving(model), tmp, max_shard_size)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config_to_hf_dict(cfg, torch_dtype=dtype, **extra), indent=2))
        for name in TOKENIZER_FILES:
            if tok_dir is not None and (tok_dir / name).is_file():
                shutil.copyfile(tok_dir / name, tmp / name)
                files.append(name)
        (tmp / "README.md").write_text(_model_card(cfg, model, tokens, source))
        files += ["config.json", "README.md"]
    return files


def convert_to_hf(checkpoint: str | Path, output_dir: str | Path, *, max_shard_size: int | str = "2GB",
                  dtype: str = "float32", overwrite: bool = False) -> dict[str, Any]:
    """``linear-moe convert to-hf``: export a checkpoint (or run) directory as an HF-style directory.

    Writes ``config.json``, ``model.safetensors`` (sharded with an index past ``max_shard_size``), the
    tokenizer files found beside the checkpoint, and ``README.md`` (sizes, mixers, training tokens from
    the checkpoint's ``state.json``), atomically; weights stored as ``dtype`` (float32 | bfloat16 | float16). Returns ``{"output_dir", "files", "parameters"}``.
    """
    from .hf_import import storage_dtype

    # the input is a training checkpoint of one's own: a sharded (dcp/) one may be read
    model = from_pretrained(checkpoint, dtype=storage_dtype(dtype), trust_dcp=True)
    _, wdir = load_model_config(checkpoint)
    tokens = None
    if (wdir / "state.json").is_file():
        try:
            tokens = json.loads((wdir / "state.json").read_text()).get("tokens")
        except ValueError:
            pass
    files = save_pretrained(model, output_dir, tokenizer_dir=find_tokenizer_dir(checkpoint), tokens=tokens,
                            source=str(checkpoint), max_shard_size=max_shard_size, overwrite=overwrite)
    return {"output_dir": str(output_dir), "files": files, "parameters": model.num_parameters()}
