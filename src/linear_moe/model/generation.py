"""Autoregressive generation that carries each mixer's state: a linear mixer's recurrent (and
short-conv) state, an attention layer's KV cache. Each new token costs O(1) in linear layers."""
from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits ``[batch, vocab]`` → token ids ``[batch]``. temperature 0 is greedy (argmax)."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling options temperature={temperature} (>= 0), top_p={top_p} (0 < p <= 1), top_k={top_k} (>= 0)")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, eos_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """input_ids ``[batch, time]`` (all prompts the same length) → ``[batch, time + new]``.

    The prompt is run once in parallel (prefill) returning every layer's state; each later step feeds one
    token with the states. Stops early when every row has produced ``eos_id``.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, time] with time >= 1, got shape {tuple(input_ids.shape)}")
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids, states=None, return_states=True, logits_to_keep=1)
        tokens = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            nxt = sample_next(out.logits[:, -1], temperature, top_p, top_k, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            tokens.append(nxt[:, None])
            if eos_id is not None and bool(done.all()):
                break
            out = model(nxt[:, None], states=out.states, return_states=True)
        return torch.cat(tokens, dim=1)
    finally:
        model.train(was_training)
