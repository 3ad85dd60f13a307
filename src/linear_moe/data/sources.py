"""Open any token source as one flat, memory-mapped token stream ``[num_tokens]``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .indexed import IndexedDataset, idx_path
from .token_cache import open_tokens


def open_source(source, dtype: str | None = None) -> np.ndarray:
    """A 1-D token array from any of:

    - a Megatron indexed-dataset prefix (``<prefix>.idx`` + ``<prefix>.bin``; ``.bin``/``.idx`` paths work too),
    - a flat token ``.bin`` (its dtype from the ``meta.json`` beside it, or ``dtype``),
    - an ``IndexedDataset``, or an in-memory 1-D array / tensor.
    """
    if isinstance(source, IndexedDataset):
        return source.tokens
    if isinstance(source, (np.ndarray, torch.Tensor)):
        arr = np.asarray(source)
        if arr.ndim != 1:
            raise DataError(f"an in-memory token source must be 1-D, got shape {arr.shape}")
        return arr
    path = Path(source)
    prefix = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
    if idx_path(prefix).is_file():
        return IndexedDataset(prefix).tokens
    if path.is_file():
        return open_tokens(path, dtype)
    raise DataError(f"data source {str(source)!r} does not exist (expected a token .bin file "
                    "or an indexed-dataset prefix with .bin + .idx)")


def default_val_source(train: str | Path) -> Path | None:
    """The held-out split that belongs to ``train``, if it exists: ``val.bin`` beside a ``train.bin``
    (``prepare_default_dataset``), or ``<prefix>_val`` beside a prefix (``prepare_data``)."""
    train = Path(train)
    if train.name == "train.bin" and (train.parent / "val.bin").is_file():
        return train.parent / "val.bin"
    prefix = train.with_suffix("") if train.suffix in (".bin", ".idx") else train
    val = Path(f"{prefix}_val")
    return val if idx_path(val).is_file() else None
