"""Autoregressive generation that carries each mixer's state: a linear mixer's recurrent (and
short-conv) state, an attention layer's KV cache. Each new token costs O(1) in linear layers.

After the prefill every attention cache is given room for the whole generation (prompt + new tokens,
rounded up), so the decode writes in place and never regrows. Prompts of different lengths (a list of
prompts) are prefilled one by one, so no mixer ever reads a pad token and each row's state is exactly the
state of that prompt alone; the rows' states are then stacked along the batch (attention caches
left-padded, with each row's first valid slot in the cache's ``start``) and the batch decodes as one batch
in every layer. Each row is the same as generating its prompt alone (greedy).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..layers.attention import is_kv_cache, reserve_kv_cache, stack_kv_caches


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
def generate(model, input_ids: torch.Tensor | Sequence[Sequence[int] | torch.Tensor], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, eos_id: int | None = None,
             generator: torch.Generator | None = None, stop_check_every: int = 8):
    """Continue prompts by up to ``max_new_tokens`` tokens.

    ``input_ids`` ``[batch, time]`` (prompts of one length) → ``[batch, time + new]``; rows that produced
    ``eos_id`` are filled with ``eos_id`` until every row has, then generation stops.
    ``input_ids`` a list of prompts (1-D token tensors or lists of ints, any lengths) → a list of 1-D
    tensors, row i = prompt i followed by its new tokens up to and including its first ``eos_id``.

    The decode loop does not wait for the device after each token: sampling stays on the device and the
    "every row finished" check reads back only every ``stop_check_every`` steps (the extra steps' tokens
    are cut off, so the result is the same as checking every step).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if stop_check_every < 1:
        raise ValueError(f"stop_check_every={stop_check_every} must be >= 1")
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
    was_training = model.training
    model.eval()
    try:
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() != 2 or input_ids.shape[1] == 0:
                raise ValueError(f"input_ids must be [batch, time] with time >= 1, got shape {tuple(input_ids.shape)}")
            out = model(input_ids, states=None, return_states=True, logits_to_keep=1)
            states = reserve_caches(out.states, max_new_tokens)
            new = _decode(model, out.logits[:, -1], states, max_new_tokens, sampling, eos_id, stop_check_every)
            return torch.cat([input_ids, new], dim=1)
        prompts = _as_prompts(input_ids, _device_of(model))
        if len({len(p) for p in prompts}) == 1:  # one length: one batched prefill, no per-row caches
            out = model(torch.stack(prompts), states=None, return_states=True, logits_to_keep=1)
            logits, states = out.logits[:, -1], out.states
        else:
            rows = [model(p[None], states=None, return_states=True, logits_to_keep=1) for p in prompts]
            logits = torch.cat([r.logits[:, -1] for r in rows])
            states = stack_states([r.states for r in rows])
        new = _decode(model, logits, reserve_caches(states, max_new_tokens), max_new_tokens, sampling, eos_id, stop_check_every)
        return [torch.cat([p, _cut_after_eos(row, eos_id)]) for p, row in zip(prompts, new)]
    finally:
        model.train(was_training)


def _decode(model, logits: torch.Tensor, states: list, max_new_tokens: int, sampling: dict, eos_id: int | None,
            stop_check_every: int) -> torch.Tensor:
    """From the last prompt logits ``[batch, vocab]`` and states, sample up to ``max_new_tokens`` tokens:
    ``[batch, new]`` (after every row has produced ``eos_id``, no further columns)."""
    batch = logits.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    tokens = []
    for step in range(max_new_tokens):
        nxt = sample_next(logits, **sampling)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done = done | (nxt == eos_id)
        tokens.append(nxt)
        if step == max_new_tokens - 1:
            break
        if eos_id is not None and (step + 1) % stop_check_every == 0 and bool(done.all()):
            break
        out = model(nxt[:, None], states=states, return_states=True)
        logits, states = out.logits[:, -1], out.states
    if not tokens:
        return logits.new_zeros(batch, 0, dtype=torch.long)
    new = torch.stack(tokens, dim=1)
    if eos_id is not None:  # drop the columns sampled after the step where the last row finished
        finished = (new == eos_id).cummax(dim=1).values.all(dim=0)
        if bool(finished.any()):
            new = new[:, : int(finished.nonzero()[0]) + 1]
    return new


def _cut_after_eos(row: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    if eos_id is None:
        return row
    hits = (row == eos_id).nonzero()
    return row if len(hits) == 0 else row[: int(hits[0]) + 1]


def _device_of(model) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _as_prompts(prompts, device: torch.device) -> list[torch.Tensor]:
    out = []
    for i, p in enumerate(prompts):
        p = torch.as_tensor(p, dtype=torch.long, device=device)
        if p.dim() != 1 or p.numel() == 0:
            raise ValueError(f"prompt {i} must be a non-empty 1-D sequence of token ids, got shape {tuple(p.shape)}")
        out.append(p)
    if not out:
        raise ValueError("generate got an empty list of prompts; give at least one")
    return out


def stack_states(rows: list, reserve: int = 0, consume: bool = False):
    """Stack per-prompt states (each from a batch-1 call) into one batch state: tensors are concatenated
    along the batch; softmax-attention caches (of different lengths) are left-padded to one cache, with room
    for ``reserve`` more slots. ``consume``: the rows' per-layer lists give up each layer once it is stacked
    (set to None), so memory holds the rows and the stack of one layer, not both whole (at batch 32 and
    32K context the softmax model's cache is 51 GB)."""
    first = rows[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(rows, dim=0)
    if is_kv_cache(first):
        return stack_kv_caches(rows, reserve)
    if isinstance(first, dict):
        return {key: stack_states([r[key] for r in rows], reserve) for key in first}
    if isinstance(first, (list, tuple)):
        out = []
        for i in range(len(first)):
            out.append(stack_states([r[i] for r in rows], reserve))
            if consume and all(isinstance(r, list) for r in rows):
                for r in rows:
                    r[i] = None
        return out
    raise TypeError(f"cannot stack a decoding state of type {type(first).__name__}")


def reserve_caches(state, new_tokens: int):
    """Every attention cache in ``state`` (nested lists / dicts) with room for ``new_tokens`` more slots."""
    if is_kv_cache(state):
        return reserve_kv_cache(state, state["used"] + new_tokens)
    if isinstance(state, dict):
        return {key: reserve_caches(value, new_tokens) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [reserve_caches(value, new_tokens) for value in state]
    return state
