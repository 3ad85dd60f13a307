"""Token log-probabilities of many sequences at once, for evaluation.

Rows are right-padded into one batch (harmless for a causal model: padding comes after every scored
position) and run through the model in chunks of ``chunk_len`` tokens that carry each layer's state
(recurrent state or KV cache), so contexts longer than one chunk cost no re-computation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def score_tokens(model, rows: list[list[int]], chunk_len: int = 2048, pad_id: int = 0,
                 device: str | torch.device = "cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """For each row of ids ``[n_i]`` return ``logp[n_i - 1]`` (fp32 log-probability of token t+1 given
    tokens 0..t) and ``greedy[n_i - 1]`` (whether it is the argmax), as CPU tensors."""
    if not rows or any(len(r) < 2 for r in rows):
        raise ValueError("score_tokens needs at least one row, each of >= 2 tokens (a context and a target)")
    if chunk_len < 1:
        raise ValueError(f"chunk_len={chunk_len} must be >= 1")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    ids = ids.to(device)
    targets = ids[:, 1:]
    logp = torch.empty(len(rows), T - 1, dtype=torch.float32, device=device)
    greedy = torch.empty(len(rows), T - 1, dtype=torch.bool, device=device)
    states = None
    for s in range(0, T - 1, chunk_len):
        e = min(s + chunk_len, T - 1)
        out = model(ids[:, s:e], states=states, return_states=True)
        states = out.states
        lp = F.log_softmax(out.logits.float(), dim=-1)
        tgt = targets[:, s:e]
        logp[:, s:e] = lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        greedy[:, s:e] = lp.argmax(-1) == tgt
    logp, greedy = logp.cpu(), greedy.cpu()
    return [logp[i, :len(r) - 1] for i, r in enumerate(rows)], [greedy[i, :len(r) - 1] for i, r in enumerate(rows)]
