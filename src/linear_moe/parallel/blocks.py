"""The blocks of a model or of a pipeline stage (whose ``layers`` is a ModuleDict keyed by layer index,
so parameter names stay those of the full model)."""
from __future__ import annotations

from torch import nn


def blocks(model: nn.Module) -> list[nn.Module]:
    layers = model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)
