"""Moving packed variable-length sequences (`cu_seqlens`) in and out of padded layouts.

Packed input is `[1, T, ...]` with sequence n on `cu_seqlens[n]:cu_seqlens[n+1]`. Two layouts help:

* `batch_packing`: `[N, Lmax, ...]`, each sequence in its own row, zero-padded at the end. The
  step-by-step forms use it: the loop runs Lmax steps for all sequences at once.
* `chunk_packing`: `[1, Tp, ...]`, each sequence starting on a chunk boundary and padded to whole
  chunks. The chunked forms use it: no chunk straddles two sequences, so only the state scan
  needs to know where sequences begin (waste is under one chunk per sequence).

Zero padding is harmless to every recurrence here because padded steps carry k = v = 0,
beta = 0 and log-decay 0: the state passes through them unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Packing:
    """Where each packed token goes in the padded layout."""

    positions: Tensor  # [T] flat destination index of each token
    padded_len: int  # rows * row_len of the padded layout
    lengths: list[int]  # tokens per sequence
    starts: list[int]  # start of each sequence in the padded layout


def _seq_ids_and_offsets(cu_seqlens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq_id = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)
    offset = torch.arange(int(cu[-1]), device=cu.device) - cu[:-1][seq_id]
    return lengths, seq_id, offset


def batch_packing(cu_seqlens: Tensor) -> tuple[Packing, int]:
    """Packing for `[N, Lmax]`; also returns Lmax (at least 1, so shapes stay valid)."""
    lengths, seq_id, offset = _seq_ids_and_offsets(cu_seqlens)
    row = max(int(lengths.max()), 1)
    n = len(lengths)
    return Packing(seq_id * row + offset, n * row, lengths.tolist(), [i * row for i in range(n)]), row


def chunk_packing(cu_seqlens: Tensor, chunk_size: int) -> Packing:
    """Packing for `[1, Tp]` where every sequence starts on a multiple of `chunk_size`."""
    lengths, seq_id, offset = _seq_ids_and_offsets(cu_seqlens)
    padded = (lengths + chunk_size - 1) // chunk_size * chunk_size
    starts = torch.cumsum(padded, 0) - padded
    return Packing(starts[seq_id] + offset, int(padded.sum()), lengths.tolist(), starts.tolist())


def scatter(x: Tensor, packing: Packing) -> Tensor:
    """`[1, T, *rest]` -> `[padded_len, *rest]` with zeros in the gaps (differentiable)."""
    out = x.new_zeros((packing.padded_len, *x.shape[2:]))
    return out.index_copy(0, packing.positions, x[0])


def gather(y: Tensor, packing: Packing) -> Tensor:
    """`[padded_len, *rest]` -> `[1, T, *rest]`: the inverse of `scatter`."""
    return y[packing.positions].unsqueeze(0)


def run_recurrence(recurrent_form, chunk_form, tensors, h0: Tensor, cu_seqlens: Tensor | None,
                   recurrent: bool, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Run one of a recurrence's two forms, on dense or packed (`cu_seqlens`) input.

    Args:
        recurrent_form: `(*tensors, h0) -> (o, final)`; chunk_form: `(*tensors, h0, chunk_size,
            packing) -> (o, final)`, both over `[B, T, ...]` tensors.
        tensors: the per-step inputs, each `[B, T, ...]` or None.
        h0: `[B or N, H, K, V]` initial states.
    Returns:
        (o `[B, T, ...]`, final states `[B or N, ...]`).
    """
    if cu_seqlens is None:
        return recurrent_form(*tensors, h0) if recurrent else chunk_form(*tensors, h0, chunk_size, None)
    if recurrent:
        packing, row = batch_packing(cu_seqlens)
        n = len(packing.lengths)
        batched = [None if x is None else scatter(x, packing).reshape(n, row, *x.shape[2:]) for x in tensors]
        o, final = recurrent_form(*batched, h0)
        return gather(o.reshape(n * row, *o.shape[2:]), packing), final
    packing = chunk_packing(cu_seqlens, chunk_size)
    packed = [None if x is None else scatter(x, packing).unsqueeze(0) for x in tensors]
    o, final = chunk_form(*packed, h0, chunk_size, packing)
    return gather(o[0], packing), final
