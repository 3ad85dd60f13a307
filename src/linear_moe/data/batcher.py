"""Training batches from a flat token file: random windows, reproducible by (seed, step).

``TokenBatcher.batch(step)`` draws its window starts from a generator seeded with
``(seed, step)`` alone, so the batch at step ``s`` is the same whether the run got there in one go
or was resumed from a checkpoint at ``s``: the loader has no state to save.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .packing import PackedBatch, pack_windows
from .sources import default_val_source, open_source
from .token_cache import DatasetInfo


class TokenBatcher:
    """Batches of ``seq_len`` next-token pairs from ``bin_path``: a memory-mapped ``train.bin``, or any
    source ``open_source`` takes (e.g. a Megatron ``.bin/.idx`` prefix from ``prepare_data``).

    ``val_path`` (same kinds) defaults to ``default_val_source(bin_path)``. With ``world_size > 1``
    every rank draws the same global batch of ``batch_size * world_size`` windows and keeps its own
    slice, so the data seen does not depend on how many ranks share it.
    """

    def __init__(self, bin_path: str | Path, seq_len: int, batch_size: int, seed: int = 0, *,
                 val_path: str | Path | None = None, rank: int = 0, world_size: int = 1,
                 dtype: str | None = None):
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be >= 1")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        self.bin_path = Path(bin_path)
        self.tokens = open_source(self.bin_path, dtype)
        if self.tokens.size < seq_len + 1:
            raise DataError(f"token file {str(self.bin_path)!r} has {self.tokens.size} tokens, "
                            f"fewer than seq_len + 1 = {seq_len + 1}")
        if val_path is None:
            val_path = default_val_source(self.bin_path)
        self.val_path = Path(val_path) if val_path is not None else None
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.dtype = rank, world_size, dtype

    @classmethod
    def from_info(cls, info: DatasetInfo, seq_len: int, batch_size: int, seed: int = 0,
                  **kwargs) -> "TokenBatcher":
        return cls(info.train_path, seq_len, batch_size, seed, val_path=info.val_path, **kwargs)

    @staticmethod
    def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
        # Fancy-index the memmap with a [B, length] index grid: one gather, no Python loop.
        idx = starts[:, None] + np.arange(length)[None, :]
        return torch.from_numpy(tokens[idx].astype(np.int64))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)``, both LongTensor ``[batch, seq_len]``; labels are inputs shifted by one."""
        if step < 0:
            raise DataError(f"step={step} must be >= 0")
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.tokens.size - self.seq_len, size=self.batch_size * self.world_size)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        w = self._windows(self.tokens, starts, self.seq_len + 1)
        return w[:, :-1], w[:, 1:]

    def packed_batch(self, step: int, eos_id: int) -> PackedBatch:
        """``batch(step)`` as a ``PackedBatch``: same tokens, plus document-aware ``cu_seqlens``,
        position ids and boundary-masked labels."""
        x, y = self.batch(step)
        return pack_windows(torch.cat([x, y[:, -1:]], dim=1), eos_id)

    def check_eval(self) -> np.ndarray:
        """The validation tokens, or a DataError when there is no split or it holds no full window (called
        before training too, so that a run does not fail at its final evaluation)."""
        if self.val_path is None:
            raise DataError(f"no validation split for {str(self.bin_path)!r}: no val.bin / <prefix>_val beside it "
                            "and no val_path given")
        val = open_source(self.val_path, self.dtype)
        if val.size < self.seq_len + 1:
            raise DataError(f"validation file {str(self.val_path)!r} has {val.size} tokens, fewer than seq_len + 1 = "
                            f"{self.seq_len + 1}: give a longer validation split, a shorter train.seq_len, or "
                            "train.eval_batches=0 (no evaluation)")
        return val

    def eval_batches(self, n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``n_batches`` batches of consecutive, non-overlapping windows from the validation split.

        Deterministic; wraps around to the start when the split is shorter than the request, so a
        tiny validation split still yields full batches. Ranks take interleaved windows.
        """
        val = self.check_eval()
        span = self.seq_len + 1
        n_windows = (val.size - 1) // self.seq_len  # windows overlap by one token: labels of one = inputs of next
        per_step = self.batch_size * self.world_size
        for b in range(n_batches):
            k = np.arange(b * per_step, (b + 1) * per_step)[self.rank::self.world_size] % n_windows
            w = self._windows(val, k * self.seq_len, span)
            yield w[:, :-1], w[:, 1:]
