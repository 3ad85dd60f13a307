"""Blended, shuffled, resumable training batches from one or more token datasets.

Each source is cut into fixed windows of ``seq_len + 1`` tokens (consecutive windows share one
token, so every token is a label once per epoch); the window order is a fresh permutation per
epoch, seeded by ``(seed, source, epoch)``. Sources are mixed by weight with Megatron's greedy
rule: sample ``i`` comes from the source furthest below its share ``weight * (i + 1)``, so the
mix is exact at every prefix, not just on average. The loader's whole position is
``{"samples": i, "counts": [...]}``: ``state_dict()`` / ``load_state_dict()`` resume with the
next unseen batch.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .packing import PackedBatch, pack_windows
from .sources import open_source


def parse_blend(spec: str) -> tuple[list[str], list[float]]:
    """Megatron's ``--data-path`` syntax: ``"prefixA"`` or ``"0.3 prefixA 0.7 prefixB"``."""
    parts = spec.split()
    if len(parts) == 1:
        return parts, [1.0]
    if len(parts) % 2:
        raise DataError(f"blend {spec!r} must be one prefix or 'weight prefix' pairs")
    try:
        weights = [float(w) for w in parts[::2]]
    except ValueError:
        raise DataError(f"blend {spec!r} must alternate weights and prefixes (a weight is not a number)") from None
    return parts[1::2], weights


class ShuffledWindows:
    """Window ``j`` of an endless, epoch-by-epoch shuffled walk over one token stream."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, stream: int = 0, name: str = "source"):
        self.tokens, self.seq_len, self.seed, self.stream = tokens, seq_len, seed, stream
        self.n = (tokens.size - 1) // seq_len
        if self.n < 1:
            raise DataError(f"{name} has {tokens.size} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:  # samples are drawn in order, so one cached epoch suffices
            self._perm, self._perm_epoch = np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n), epoch
        return self._perm

    def window(self, j: int) -> np.ndarray:
        """Tokens ``[seq_len + 1]`` of the ``j``-th window drawn (``j`` counts across epochs)."""
        k = int(self._order(j // self.n)[j % self.n])
        return np.asarray(self.tokens[k * self.seq_len:k * self.seq_len + self.seq_len + 1])


def next_source(weights: np.ndarray, counts: np.ndarray, i: int) -> int:
    """Source of global sample ``i``: the one furthest below its target share ``weights * (i + 1)``."""
    return int(np.argmax(weights * (i + 1) - counts))


class BlendedLoader:
    """Batches ``(input_ids, labels)`` LongTensor ``[batch, seq_len]`` (or ``PackedBatch`` with
    ``pack=True``) drawn from ``sources`` in proportion to ``weights``.

    With ``world_size > 1`` all ranks walk the same global sequence of ``batch_size * world_size``
    samples per step and each keeps its slice.
    """

    def __init__(self, sources: Sequence, weights: Sequence[float] | None, seq_len: int, batch_size: int,
                 seed: int = 0, *, rank: int = 0, world_size: int = 1, pack: bool = False,
                 eos_id: int | None = None):
        if not sources:
            raise DataError("BlendedLoader needs at least one source")
        weights = [1.0] * len(sources) if weights is None else list(weights)
        if len(weights) != len(sources):
            raise DataError(f"got {len(weights)} weights for {len(sources)} sources")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"weights {weights} must be >= 0 with a positive sum")
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        if pack and eos_id is None:
            raise DataError("pack=True needs eos_id to find document boundaries")
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.sources = [ShuffledWindows(open_source(s), seq_len, seed, stream=i, name=f"source {i} ({s!s:.80})")
                        for i, s in enumerate(sources)]
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.pack, self.eos_id = rank, world_size, pack, eos_id
        self.samples = 0
        self.counts = np.zeros(len(sources), dtype=np.int64)

    def _draw(self) -> np.ndarray:
        d = next_source(self.weights, self.counts, self.samples)
        w = self.sources[d].window(int(self.counts[d]))
        self.counts[d] += 1
        self.samples += 1
        return w

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor] | PackedBatch:
        rows = [self._draw() for _ in range(self.batch_size * self.world_size)]
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        windows = torch.from_numpy(np.stack(mine).astype(np.int64))
        if self.pack:
            return pack_windows(windows, self.eos_id)
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The loader's position (plus what it must match on resume)."""
        return {"samples": self.samples, "counts": self.counts.tolist(), "seed": self.seed,
                "weights": self.weights.tolist(), "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "seq_len"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"loader state has {key}={state.get(key)!r} but this loader has {getattr(self, key)!r}")
        if len(state.get("counts", [])) != len(self.sources) or not np.allclose(state.get("weights"), self.weights):
            raise DataError(f"loader state was saved for weights {state.get('weights')}, this loader has {self.weights.tolist()}")
        if sum(state["counts"]) != state["samples"]:
            raise DataError(f"loader state is inconsistent: counts {state['counts']} do not add up to samples={state['samples']}")
        self.samples = int(state["samples"])
        self.counts = np.asarray(state["counts"], dtype=np.int64)
