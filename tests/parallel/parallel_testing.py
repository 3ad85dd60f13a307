"""Spawn gloo process groups on CPU for the parallel tests: free port, timeouts, errors surfaced.

``run_distributed(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in ``world_size``
fresh processes with ``torch.distributed`` initialised (gloo) and returns the list of their results
(in rank order). A worker's exception is re-raised here with its traceback; a job that does not
finish in ``timeout`` seconds is killed and fails the test (tests never hang).
"""
from __future__ import annotations

import io
import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=__import__("datetime").timedelta(seconds=60))
        out = fn(rank, world_size, *args)
        buffer = io.BytesIO()  # plain bytes: tensors sent through shared memory vanish with the worker
        torch.save(out, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 120.0):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outputs, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                try:  # the first failure often only reports a peer's crash: collect the others briefly
                    while True:
                        other, _, text = results.get(timeout=3)
                        errors.append(f"rank {other}:\n{text}")
                except queue.Empty:
                    pass
                break
            outputs[rank] = torch.load(io.BytesIO(value), weights_only=False)
    except queue.Empty:
        errors.append(f"distributed job timed out after {timeout}s; finished ranks: {sorted(outputs)}")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise AssertionError("\n".join(errors))
    return [outputs[r] for r in range(world_size)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` (0 for two zero tensors)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)
