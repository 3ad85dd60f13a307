"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning-rate schedule."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on 2-D weights (projections, experts, embeddings); none on norms, biases, gates' scalars."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay) and torch.cuda.is_available()
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    if cfg.cuda_graph and fused:
        lr_as_tensor(optimizer, (decay + no_decay)[0].device)
    return optimizer


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_as_tensor(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Ready ``optimizer`` to be replayed in a CUDA graph: step counters on the device (``capturable``) and each
    group's lr a device tensor that ``set_lr`` updates in place (a float would be frozen into the captured
    kernel). Also after loading a checkpoint, which holds float lrs (``lr_as_float``)."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        group["capturable"] = True


@contextlib.contextmanager
def lr_as_float(optimizer: torch.optim.Optimizer):
    """Param groups with a float lr while the block runs (a checkpoint), the same lr tensors after (a
    captured CUDA graph reads those very tensors)."""
    tensors = [g["lr"] if isinstance(g["lr"], torch.Tensor) else None for g in optimizer.param_groups]
    for g, lr in zip(optimizer.param_groups, tensors):
        if lr is not None:
            g["lr"] = float(lr)
    try:
        yield
    finally:
        for g, lr in zip(optimizer.param_groups, tensors):
            if lr is not None:
                g["lr"] = lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # a CUDA-graph step reads this tensor: update it in place
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
