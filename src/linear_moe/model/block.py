"""One pre-norm block: ``x + token_mixer(norm(x))``, then ``x + channel_mixer(norm(x))``."""
from __future__ import annotations

import torch
from torch import nn

from ..layers.common import RMSNorm
from ..layers.registry import build_mixer
from ..moe import MoELayer, SwiGLUMLP
from .config import ModelConfig


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_name = config.layer_mixer(layer_idx)
        self.mixer_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = build_mixer(self.mixer_name, config.hidden_size, config.mixer_options, config.attention,
                                 layer_idx, config.num_layers)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.is_moe = config.resolved_ffn_pattern()[layer_idx] == "E"
        if self.is_moe:
            self.ffn = MoELayer(config.hidden_size, config.moe)
        else:
            self.ffn = SwiGLUMLP(config.hidden_size, config.dense_intermediate_size())

    def forward(self, x: torch.Tensor, state: dict | None = None, cu_seqlens: torch.Tensor | None = None):
        """x: ``[batch, time, hidden]``. Returns ``(x, new_state, aux)`` where ``aux`` maps loss names to
        scalar tensors already scaled by their coefficients (MoE balance / z-loss, MoM router loss)."""
        h, new_state = self.mixer(self.mixer_norm(x), state=state, cu_seqlens=cu_seqlens)
        x = x + h
        aux: dict[str, torch.Tensor] = {}
        mixer_aux = getattr(self.mixer, "aux_loss", None)
        if self.training and mixer_aux is not None:
            aux["mixer_aux_loss"] = mixer_aux
        if self.is_moe:
            y, moe_aux = self.ffn(self.ffn_norm(x))
            aux["moe_balance_loss"] = moe_aux.balance_loss_scaled
            if self.ffn.cfg.z_loss_coef:
                aux["moe_z_loss"] = moe_aux.z_loss_scaled
        else:
            y = self.ffn(self.ffn_norm(x))
        return x + y, new_state, aux

