"""Expert-load bookkeeping for the trainer: collect per-layer load each step, plot it as a heatmap."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .layer import MoELayer


def collect_expert_load(model: nn.Module) -> torch.Tensor:
    """Tokens per expert of every ``MoELayer`` in ``model`` from its last forward -> [layers, E] (cpu, float).

    Layers that have not run yet are skipped; returns an empty ``[0, 0]`` tensor when none have.
    """
    rows = [m.last_stats["tokens_per_expert"].detach().float().cpu()
            for m in model.modules() if isinstance(m, MoELayer) and m.last_stats]
    return torch.stack(rows) if rows else torch.zeros(0, 0)


def plot_expert_load(history: Sequence, path: str | Path, title: str = "expert load") -> Path:
    """Write a PNG heatmap of the share of routed tokens per expert, one panel per layer, steps on x.

    ``history``: per step a ``[layers, E]`` array (e.g. ``collect_expert_load`` each step), i.e. anything
    ``numpy.asarray`` turns into ``[steps, layers, E]``. Colour is the fraction of that layer's tokens
    at that step (1/E is perfect balance). Needs matplotlib (imported here only).
    """
    import numpy as np

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plot_expert_load needs matplotlib: pip install matplotlib") from err

    load = np.asarray([np.asarray(torch.as_tensor(step).float()) for step in history], dtype=np.float64)
    if load.ndim != 3 or load.shape[0] == 0:
        raise ValueError(f"history must be [steps, layers, experts] with at least one step, got shape {load.shape}")
    steps, layers, experts = load.shape
    share = load / np.clip(load.sum(-1, keepdims=True), 1e-12, None)
    fig, axes = plt.subplots(layers, 1, figsize=(max(4.0, min(12.0, 0.1 * steps + 3)), 1.0 + 1.6 * layers), squeeze=False)
    vmax = max(share.max(), 2.0 / experts)
    for i, ax in enumerate(axes[:, 0]):
        im = ax.imshow(share[:, i, :].T, aspect="auto", origin="lower", interpolation="nearest", vmin=0.0, vmax=vmax, cmap="viridis")
        ax.set_ylabel(f"layer {i}\nexpert")
        if i == layers - 1:
            ax.set_xlabel("step")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="share of tokens (1/E = balanced)")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
