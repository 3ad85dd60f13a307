"""Sequence packing with document boundaries: windows that span several documents, plus the
``cu_seqlens`` and position ids a variable-length mixer needs to keep documents apart.

A window of the token stream (documents each closed by EOS) holds the end of one document, a few
whole ones and the start of another. ``pack_windows`` marks where each document piece starts so
attention / recurrent state never flows from one document into the next, restarts position ids
at every document, and masks the one label per boundary that would ask the model to predict a
new document's first token from the previous document.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


@dataclass
class PackedBatch:
    """A packed batch. ``cu_seqlens`` indexes the flattened ``[batch * time]`` tokens.

    input_ids, labels, position_ids: LongTensor ``[batch, time]``;
    cu_seqlens: int32 ``[num_segments + 1]``, starts with 0 and ends with ``batch * time``; every
    row boundary is also a segment boundary, so segment ``i`` is
    ``input_ids.flatten()[cu_seqlens[i]:cu_seqlens[i + 1]]``.
    max_seqlen: the longest segment.
    """
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    def flatten(self) -> "PackedBatch":
        """The varlen layout (fla's convention): every tensor ``[1, batch * time]``, same ``cu_seqlens``."""
        return PackedBatch(self.input_ids.reshape(1, -1), self.labels.reshape(1, -1),
                           self.position_ids.reshape(1, -1), self.cu_seqlens, self.max_seqlen)

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.labels.to(device), self.position_ids.to(device),
                           self.cu_seqlens.to(device), self.max_seqlen)


def segment_starts(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Bool ``[batch, time]``: True where a document piece starts (row start, or right after EOS)."""
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    return starts


def pack_windows(windows: torch.Tensor, eos_id: int, mask_boundary_labels: bool = True) -> PackedBatch:
    """Pack ``windows`` (LongTensor ``[batch, time + 1]`` of consecutive stream tokens).

    Inputs are ``windows[:, :-1]``, labels ``windows[:, 1:]``. A label is set to ``IGNORE_INDEX``
    where its input is EOS (it would be the next document's first token) if ``mask_boundary_labels``.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [batch, time + 1] with time >= 1, got shape {tuple(windows.shape)}")
    inputs, labels = windows[:, :-1], windows[:, 1:].clone()
    b, t = inputs.shape
    starts = segment_starts(inputs, eos_id)
    # position = distance to the latest segment start at or before each token
    arange = torch.arange(t, device=inputs.device).expand(b, t)
    last_start = torch.where(starts, arange, torch.zeros_like(arange)).cummax(dim=1).values
    position_ids = arange - last_start
    flat_starts = starts.flatten().nonzero().flatten()
    cu = torch.cat([flat_starts, torch.tensor([b * t], device=inputs.device)]).to(torch.int32)
    if mask_boundary_labels:
        labels[inputs == eos_id] = IGNORE_INDEX
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    return PackedBatch(inputs.contiguous(), labels, position_ids, cu, max_seqlen)
