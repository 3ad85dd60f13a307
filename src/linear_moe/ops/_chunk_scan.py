"""The one sequential piece of every chunked form: passing the state from chunk to chunk.

Each chunk n maps the state at its start to the state at its end by an affine map

    S_end = M_n S_start + H_n

with M_n diagonal over the key rows for gated linear attention (the chunk's total decay) and a full
`[K, K]` matrix for the delta rule. Everything else in a chunked form is computed for all chunks at
once; keeping this scan separate is also what LASP-2 needs (it runs the same map across devices).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._varlen import Packing


def apply_transition(trans: Tensor, state: Tensor) -> Tensor:
    """M S for `trans` `[..., K]` / `[..., 1]` (diagonal) or `[..., K, K]` (full); state `[..., K, V]`."""
    if trans.dim() == state.dim():
        return trans @ state
    return trans.unsqueeze(-1) * state


def scan_chunks(trans: Tensor, incr: Tensor, h0: Tensor, packing: Packing | None = None,
                chunk_size: int = 1) -> tuple[Tensor, Tensor]:
    """States at the start of every chunk, and the final state of every sequence.

    Args:
        trans: `[B, H, N, K]` / `[B, H, N, 1]` (diagonal) or `[B, H, N, K, K]`: M_n per chunk.
        incr: `[B, H, N, K, V]`: H_n, the chunk's end state when it starts from zero.
        h0: `[B, H, K, V]`, or `[S, H, K, V]` with `packing` (B == 1, S sequences that each start
            on a chunk boundary; the state resets to h0[s] where sequence s starts).
    Returns:
        starts `[B, H, N, K, V]`, finals `[B, H, K, V]` (or `[S, H, K, V]`).
    """
    n_chunks = incr.shape[2]
    if packing is None:
        groups = [(h0, 0, n_chunks)]
    else:
        groups = [(h0[s:s + 1], start // chunk_size, -(-length // chunk_size))
                  for s, (start, length) in enumerate(zip(packing.starts, packing.lengths))]
    starts: list[Tensor | None] = [None] * n_chunks
    finals = []
    for state, first, count in groups:
        for n in range(first, first + count):
            starts[n] = state
            state = apply_transition(trans[:, :, n], state) + incr[:, :, n]
        finals.append(state)
    if n_chunks == 0:
        return incr.new_zeros(incr.shape), torch.cat(finals, 0)
    return torch.stack(starts, dim=2), torch.cat(finals, 0)
