"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning-rate schedule."""
from __future__ import annotations

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
    if cfg.cuda_graph and fused:
        # replayed as a CUDA graph: step counters on the device, and the learning rate a device tensor that
        # set_lr updates in place (a float would be frozen into the captured kernel)
        lr = torch.tensor(cfg.lr, dtype=torch.float32, device=decay[0].device if decay else no_decay[0].device)
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=True, capturable=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # a CUDA-graph step reads this tensor: update it in place
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
