"""One training step (forward, backward, optimizer step) captured as a single CUDA graph and replayed.

Eagerly, a Linear-MoE step issues thousands of kernels (fla's Triton wrappers cost tens of microseconds of
host time each) and at 8K tokens per step the host, not the GPU, sets the pace. A step with static shapes
and no host-device syncs (the CPU suite checks every model kind for both) can be recorded once and replayed:
on the H100 that took the A0.3B-2B Gated DeltaNet step from 27.9K to 50.4K tokens/s at 8K tokens per step.

The recipe is PyTorch's whole-network capture: warm-up steps on a side stream (lazy initialisation and
Triton autotuning happen there, outside the capture), gradients set to None so the captured backward
allocates them from the graph's private pool and every replay writes them afresh (no zeroing needed), and
an optimizer whose state lives on the device (``capturable=True``; a learning rate that changes must be a
tensor the caller updates in place). The inputs are static tensors: copy each batch into them before
``replay()``. Autocast must not cache casts across the graph boundary (``cache_enabled=False``).
"""
from __future__ import annotations

from typing import Callable

import torch


def capture_step(step: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
                 warmup: int = 2) -> Callable[[], torch.Tensor]:
    """Record ``step`` (forward, backward, ``optimizer.step()``; returns the loss tensor) in a CUDA graph after
    ``warmup`` eager runs on a side stream; returns a function that replays it and returns the loss tensor the
    graph writes (read it after the replay, e.g. ``float(loss)``, which waits for the GPU).

    The warm-up runs are real steps: they update the parameters like any other.
    """
    for group in optimizer.param_groups:
        if not group.get("capturable", False):
            raise ValueError(f"capture_step: build the optimizer with capturable=True (got {type(optimizer).__name__} "
                             "with capturable=False): its step counters must live on the device")
    if not torch.cuda.is_available():
        raise RuntimeError("capture_step needs a CUDA device (CUDA graphs)")
    side = torch.cuda.Stream()
    for _ in range(max(1, warmup)):
        _on_side_stream(side, lambda: (optimizer.zero_grad(set_to_none=True), step()))
    optimizer.zero_grad(set_to_none=True)
    graph, loss = _record(step)

    def replay() -> torch.Tensor:
        graph.replay()
        return loss

    replay.graph = graph  # kept alive with the function; its pool holds the step's activations and gradients
    return replay


def capture(fn: Callable[[], object], warmup: int = 2) -> Callable[[], object]:
    """``fn`` run ``warmup`` times eagerly on a side stream, then recorded in a CUDA graph; returns a function that
    replays it and returns the outputs the graph writes. For a step without an optimizer (a layer's forward and
    backward in a benchmark); a training step goes through ``capture_step``."""
    if not torch.cuda.is_available():
        raise RuntimeError("capture needs a CUDA device (CUDA graphs)")
    side = torch.cuda.Stream()
    for _ in range(max(1, warmup)):
        _on_side_stream(side, fn)
    graph, out = _record(fn)

    def replay():
        graph.replay()
        return out

    replay.graph = graph  # kept alive with the function
    return replay


class GraphedStep:
    """The trainer's step as a CUDA graph: ``body(batches) -> tuple of tensors`` runs eagerly on a side stream
    for the first ``warmup`` calls (lazy initialisation, Triton autotuning; these are real steps), is captured
    at the next call and replayed from then on. Each call first copies its batches into the static input
    tensors the graph reads; it returns copies of the graph's outputs (the next replay overwrites them).

    ``body`` must start with ``optimizer.zero_grad(set_to_none=True)`` (see ``capture_step``), keep shapes
    static (no packed ``cu_seqlens``, whose length changes) and make no host-device sync.
    """

    def __init__(self, body: Callable, warmup: int = 2):
        self.body, self.warmup, self.calls = body, max(1, warmup), 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: list | None = None
        self.outputs: tuple | None = None
        self.side = torch.cuda.Stream()

    def __call__(self, batches: list) -> tuple:
        if self.static is None:
            self.static = [b.__class__(b.input_ids.clone(), b.labels.clone(), None) for b in batches]
        else:
            for s, b in zip(self.static, batches):
                s.input_ids.copy_(b.input_ids)
                s.labels.copy_(b.labels)
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            return tuple(o.clone() for o in _on_side_stream(self.side, lambda: self.body(self.static)))
        if self.graph is None:  # records the step; the replay below runs it
            self.graph, self.outputs = _record(lambda: self.body(self.static))
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)


def _on_side_stream(side: torch.cuda.Stream, fn: Callable):
    """``fn()`` run eagerly on ``side``, ordered after and before the current stream's work (the warm-up
    steps: lazy initialisation and autotuning happen off the stream a graph is later captured from)."""
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def _record(fn: Callable) -> tuple[torch.cuda.CUDAGraph, object]:
    """``fn`` captured (not run) as a CUDA graph: (graph, the outputs its replays write)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the warm-up's cached blocks would otherwise sit beside the graph's own pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
