"""A job's whole configuration: model, training, parallel layout and data, as typed dataclasses.

Built in three layers: a named preset, then a TOML file, then ``--section.field value`` overrides
from the command line. Every unknown key or badly typed value is rejected with a message naming it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .model.config import ModelConfig
from .model.presets import PRESETS, model_preset
from .parallel.config import ParallelConfig
from .train.config import DataConfig, TrainConfig


class ConfigError(ValueError):
    """A bad preset, key or value; the message names it and what is allowed."""


@dataclass
class JobConfig:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def validate(self, world_size: int = 1) -> "JobConfig":
        try:
            self.model.validate()
            self.parallel.validate(world_size, num_heads=self.model.attention.num_heads,
                                   num_experts=self.model.moe.num_experts, vocab_size=self.model.vocab_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        t = self.train
        checks = [
            (t.batch_size >= 1, f"train.batch_size={t.batch_size} must be >= 1"),
            (t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1"),
            (t.seq_len >= 2, f"train.seq_len={t.seq_len} must be >= 2"),
            (t.max_steps >= 1 or t.max_tokens > 0, f"train.max_steps={t.max_steps} must be >= 1 (or set train.max_tokens)"),
            (t.lr > 0, f"train.lr={t.lr} must be > 0"),
            (0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]"),
            (t.precision in ("auto", "fp32", "bf16"), f"train.precision={t.precision!r} must be one of auto, fp32, bf16"),
            (t.device in ("auto", "cpu", "cuda"), f"train.device={t.device!r} must be one of auto, cpu, cuda"),
            (t.keep_last >= 1, f"train.keep_last={t.keep_last} must be >= 1"),
            (not t.cuda_graph or not self.data.packing,
             "train.cuda_graph needs data.packing=false: packed batches change the shape of cu_seqlens every step, "
             "and a CUDA graph replays fixed shapes"),
            (not t.cuda_graph or (self.parallel.pp == 1 and not t.compile),
             "train.cuda_graph cannot be combined with pipeline parallelism or train.compile"),
            (t.eval_batches >= 0, f"train.eval_batches={t.eval_batches} must be >= 0 (0: no evaluation)"),
            (t.eval_interval >= 0, f"train.eval_interval={t.eval_interval} must be >= 0 (0: only at the end)"),
            (not t.wandb_project or importlib.util.find_spec("wandb") is not None,
             f"train.wandb_project={t.wandb_project!r} needs wandb (pip install wandb), or leave it empty"),
            (t.activation_checkpointing in ("none", "selective", "full"),
             f"train.activation_checkpointing={t.activation_checkpointing!r} must be one of none, selective, full"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self


# ---- building ----------------------------------------------------------------------------------

def build_job_config(preset: str | None = None, config_file: str | Path | None = None,
                     overrides: list[tuple[str, str]] | None = None) -> JobConfig:
    """Preset (default ``tiny``) → TOML file → dotted ``overrides`` such as ``("model.hidden_size", "512")``."""
    data: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    name = preset or data.get("preset") or "tiny"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    job = JobConfig(preset=name, model=model_preset(name))
    data.pop("preset", None)
    job = _merge(job, data, "")
    for key, value in overrides or []:
        job = set_dotted(job, key, value)
    return job


def set_dotted(obj: Any, key: str, raw: str, _prefix: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with the field at dotted ``key`` set from the string ``raw``."""
    head, _, rest = key.partition(".")
    full = _prefix + key
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if head not in fields:
        raise ConfigError(f"unknown config key {full!r}: {type(obj).__name__} has fields {', '.join(fields)}")
    current = getattr(obj, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {full!r}: {_prefix + head!r} is a value, not a section")
        return dataclasses.replace(obj, **{head: set_dotted(current, rest, raw, _prefix + head + ".")})
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"config key {full!r} is a section; set one of its fields, e.g. {full}.{dataclasses.fields(current)[0].name}")
    hints = typing.get_type_hints(type(obj))
    return dataclasses.replace(obj, **{head: _parse(raw, hints[head], full)})


def _merge(obj: Any, data: dict[str, Any], prefix: str) -> Any:
    fields = {f.name for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for k, v in data.items():
        if k not in fields:
            raise ConfigError(f"unknown config key {prefix + k!r}; {type(obj).__name__} has fields {', '.join(sorted(fields))}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"config key {prefix + k!r} must be a table of fields, got {v!r}")
            changes[k] = _merge(current, v, prefix + k + ".")
        else:
            changes[k] = _coerce(v, hints[k], prefix + k)
    return dataclasses.replace(obj, **changes)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"config key {key!r} expects {typ.__name__}, got {value!r}")


def _parse(raw: str, typ: Any, key: str) -> Any:
    if not isinstance(raw, str):
        return _coerce(raw, typ, key)
    try:
        if typ is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(float(raw)) if raw.replace("e", "").replace("E", "").isdigit() else int(raw)
        if typ is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"config key {key!r} expects {typ.__name__}, got {raw!r}") from None
    return raw
