"""A hook point that lets sequence parallelism (``linear_moe.parallel.lasp2``) take over the ops.

The token mixers call plain ops (`gla`, `delta_rule`, `short_conv`, `causal_attention`,
`rotary_cos_sin`) on what they believe is the whole sequence. When the time axis is split over
devices, each op must combine its shard with the others' (LASP-2). Rather than teach every mixer
about devices, the public ops look up a *sequence-parallel handler* at entry and, when one is set,
hand the call over. ``ops`` never imports ``parallel``: the handler is any object with methods of
the ops' names (see `SequenceParallelHandler`), installed from above with `sequence_parallel`.

A `ContextVar` (not a global) so that a recomputation in another thread (activation checkpointing
in the backward pass) sees the handler only when the wrapped forward sets it again.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Protocol

from torch import Tensor

_HANDLER: contextvars.ContextVar = contextvars.ContextVar("linear_moe_sequence_parallel", default=None)


class SequenceParallelHandler(Protocol):
    """What a handler provides: the ops' own signatures, plus the global position of local tokens."""

    def gla(self, q, k, v, log_decay=None, **kwargs) -> tuple[Tensor, Tensor | None]: ...
    def delta_rule(self, q, k, v, beta, log_decay=None, **kwargs) -> tuple[Tensor, Tensor | None]: ...
    def short_conv(self, x, weight, bias=None, **kwargs) -> tuple[Tensor, Tensor | None]: ...
    def causal_attention(self, q, k, v, **kwargs) -> Tensor: ...
    def global_positions(self, positions: Tensor) -> Tensor: ...


def sequence_parallel_handler() -> SequenceParallelHandler | None:
    """The handler set by the innermost `sequence_parallel` block, or None (ops run locally)."""
    return _HANDLER.get()


@contextlib.contextmanager
def sequence_parallel(handler: SequenceParallelHandler | None) -> Iterator[None]:
    """Within the block, the public ops delegate to ``handler`` (None: run locally, e.g. inside the
    handler itself, which calls the ops on its shard)."""
    token = _HANDLER.set(handler)
    try:
        yield
    finally:
        _HANDLER.reset(token)
