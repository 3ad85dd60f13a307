"""One registry of token mixers: a name maps to an `nn.Module` class with one interface.

Every mixer class is constructed as ``cls(hidden_size, mixer_cfg, attention_cfg, layer_idx, num_layers)``
and called as ``forward(x, state=None, cu_seqlens=None) -> (y, new_state)`` with ``x`` and ``y`` of
shape ``[batch, time, hidden]``. ``state`` is what the previous call returned (``None`` at the start);
``new_state`` carries whatever the mixer needs to continue the sequence one token at a time.
"""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from .config import AttentionConfig, MixerConfig

MIXERS: dict[str, type[nn.Module]] = {}
# Short names the original Linear-MoE scripts and papers use.
ALIASES = {"gdn": "gated_deltanet", "la": "linear_attention", "lightning": "lightning_attention", "softmax": "attention",
           "mom": "mom_gla", "ssd": "mamba2"}


def canonical_mixer_name(name: str) -> str:
    return ALIASES.get(name, name)


def register_mixer(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MIXERS:
            raise ValueError(f"token mixer {name!r} registered twice")
        MIXERS[name] = cls
        cls.mixer_name = name
        return cls

    return wrap


def available_mixers() -> list[str]:
    _import_all()
    return sorted(MIXERS)


def build_mixer(
    name: str,
    hidden_size: int,
    mixer: MixerConfig,
    attention: AttentionConfig,
    layer_idx: int,
    num_layers: int,
) -> nn.Module:
    _import_all()
    name = canonical_mixer_name(name)
    if name not in MIXERS:
        raise ValueError(f"unknown token mixer {name!r}; choose one of: {', '.join(sorted(MIXERS))}")
    return MIXERS[name](hidden_size, mixer, attention, layer_idx, num_layers)


def _import_all() -> None:
    # The package's __init__ imports every mixer module, and each registers itself on import.
    importlib.import_module("linear_moe.layers")
