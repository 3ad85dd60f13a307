"""The decoder-only language model: embeddings, a stack of blocks, a final norm and the LM head."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.common import RMSNorm
from ..moe.experts import GroupedExperts
from ..ops.cross_entropy import linear_cross_entropy
from .block import Block
from .config import ModelConfig


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None                 # LM loss + aux losses (what to backpropagate)
    logits: torch.Tensor | None               # [batch, time, vocab]
    lm_loss: torch.Tensor | None = None       # cross-entropy alone
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # summed over layers, already scaled
    states: list | None = None                # per-layer mixer states, to continue the sequence


class LinearMoEForCausalLM(nn.Module):
    """``model(input_ids, labels=...)``: ``labels[b, t]`` is the token that should follow ``input_ids[b, t]``
    (already shifted; -100 is ignored). With ``cu_seqlens`` (batch 1, packed documents) every mixer resets
    its state at each document boundary."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # ``(x [batch, time, hidden], head weight, labels [batch, time]) -> loss``; parallel/ may set one
        # (e.g. tensor parallelism's vocab-parallel loss), which then replaces the logits path.
        self.lm_loss_fn = None
        self.init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for linear and embedding weights, zero biases; residual output
        projections scaled down by sqrt(2 * layers) (GPT-2). Modules with a ``post_init()`` (mixers with
        special parameters such as decay rates) re-initialise theirs afterwards."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, GroupedExperts):
                module.reset_parameters(std)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight", ".down_proj")):
                p.mul_(1 / math.sqrt(2 * self.config.num_layers))
        for module in self.modules():
            if module is not self and hasattr(module, "post_init"):
                module.post_init()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, states: list | None = None,
                return_states: bool = False, logits_to_keep: int = 0, return_logits: bool = True) -> CausalLMOutput:
        """input_ids ``[batch, time]``; states: what a previous call returned (to continue decoding).
        ``logits_to_keep=n`` computes logits for the last n positions only (generation).
        ``return_logits=False`` with labels computes the loss chunk by chunk without keeping the logits
        (training at long context with a large vocabulary)."""
        if cu_seqlens is not None and input_ids.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got batch {input_ids.shape[0]}")
        x = self.embed(input_ids)
        states = states if states is not None else [None] * len(self.layers)
        new_states, aux_losses = [], {}
        for layer, state in zip(self.layers, states):
            x, state, aux = layer(x, state=state, cu_seqlens=cu_seqlens)
            new_states.append(state)
            for k, v in aux.items():
                aux_losses[k] = aux_losses[k] + v if k in aux_losses else v
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        loss = lm_loss = logits = None
        if labels is not None and self.lm_loss_fn is not None:  # set by parallel/ (vocab-parallel loss); no logits
            lm_loss = self.lm_loss_fn(x, self.lm_head.weight, labels)
        elif labels is not None and not return_logits:
            lm_loss = linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, labels.flatten())
        else:
            logits = self.lm_head(x)
            if labels is not None:
                lm_loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        if lm_loss is not None:
            loss = lm_loss + sum(aux_losses.values()) if aux_losses else lm_loss
        return CausalLMOutput(loss=loss, logits=logits, lm_loss=lm_loss, aux_losses=aux_losses,
                              states=new_states if return_states else None)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Continue ``input_ids`` ``[batch, time]`` by ``max_new_tokens``; see ``model.generation.generate``."""
        from .generation import generate

        return generate(self, input_ids, max_new_tokens, **sampling)

    # ---- sizes -----------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_active_parameters(self) -> int:
        """Parameters one token uses: all but the routed experts it is not sent to."""
        total = self.num_parameters()
        moe = self.config.moe
        for layer in self.layers:
            if layer.is_moe:
                routed = sum(p.numel() for n, p in layer.ffn.named_parameters() if _is_routed_expert_param(n))
                total -= routed * (moe.num_experts - moe.top_k) // moe.num_experts
        return total


def _is_routed_expert_param(name: str) -> bool:
    return name.startswith("experts.") or ".experts." in name
