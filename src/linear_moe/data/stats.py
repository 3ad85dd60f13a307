"""Corpus statistics used as baselines for the loss curve."""
from __future__ import annotations

import numpy as np
import torch


def unigram_entropy(tokens) -> float:
    """Entropy in nats/token of the tokens' empirical unigram distribution.

    This is the cross-entropy a model that ignores context entirely would reach on the same data;
    an LM whose eval loss is not well below it has learned nothing about context.
    ``tokens``: any 1-D integer array, tensor or list of non-negative ids.
    """
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens).reshape(-1)
    if arr.size == 0:
        raise ValueError("unigram_entropy needs at least one token, got an empty sequence")
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0:
        raise ValueError(f"unigram_entropy needs non-negative integer token ids, got dtype {arr.dtype}")
    counts = np.bincount(arr.astype(np.int64))
    p = counts[counts > 0] / arr.size
    return float(-(p * np.log(p)).sum())
