"""The dense channel mixer: a SwiGLU MLP (Llama, and the shared experts of DeepSeek-V2 / Qwen2-MoE)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases.

    ``forward(x [..., hidden_size]) -> [..., hidden_size]``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        if hidden_size < 1 or intermediate_size < 1:
            raise ValueError(f"SwiGLUMLP sizes must be >= 1, got hidden_size={hidden_size}, intermediate_size={intermediate_size}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def reset_parameters(self, std: float | None = None) -> None:
        """Normal(0, std) weights, or nn.Linear's default when ``std`` is None."""
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            if std is None:
                lin.reset_parameters()
            else:
                nn.init.normal_(lin.weight, std=std)
