"""Input checks, mode choice and backend dispatch shared by the public ops.

Every bad input raises one ValueError naming the bad value and what is allowed, so a layer author
sees at once which argument is wrong.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

MODES = ("auto", "recurrent", "chunk")
# `mode="auto"` runs step by step when every sequence is at most this long (decoding, short prompts):
# the chunked form's padding to a whole chunk and its matmuls do not pay off there.
AUTO_RECURRENT_MAX_LEN = 16


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs; fp64 stays fp64 (lets tests run the ops in double)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype x's projections compute in: autocast's where it is on for x's device, else x's own. Glue written
    in it costs no extra rounding (the next projection would cast to it anyway) and half the traffic of fp32."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def check_rank(name: str, x: Tensor, rank: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have shape {layout} ({rank} dims), got shape {tuple(x.shape)}")


def check_shape(name: str, x: Tensor | None, expected: tuple[int, ...], layout: str) -> None:
    if x is None:
        return
    if not isinstance(x, Tensor) or tuple(x.shape) != tuple(expected):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {got}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    """q, k ``[B, T, H, K]`` and v ``[B, T, H, V]`` → (B, T, H, K, V), or a ValueError naming the bad one."""
    check_rank("q", q, 4, "[B, T, H, K]")
    B, T, H, K = q.shape
    check_shape("k", k, (B, T, H, K), "[B, T, H, K] like q")
    check_rank("v", v, 4, "[B, T, H, V]")
    V = v.shape[-1]
    check_shape("v", v, (B, T, H, V), "[B, T, H, V] with B, T, H of q")
    return B, T, H, K, V


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; allowed: {', '.join(repr(m) for m in MODES)}")


def check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (64 is the default)")


class LastTensor:
    """What was derived from the last tensor seen, kept while that same tensor object lives unchanged (its content
    version) and the extra key matches. A new tensor, or the same one changed in place, misses.

    For host reads of the cu_seqlens every layer of a packed step passes: on a GPU each read is a device sync that
    stalls the host's kernel launches, so it happens once per tensor, not once per layer. Values must not be None.
    """

    def __init__(self):
        self._ref, self._key, self._value = None, None, None

    def get(self, t: Tensor, *key):
        """The value stored for ``t`` under ``key``, or None."""
        if self._ref is not None and self._ref() is t and self._key == (t._version, *key):
            return self._value
        return None

    def put(self, t: Tensor, value, *key):
        """Remember ``value`` for ``t`` under ``key``; returns it."""
        self._ref, self._key, self._value = weakref.ref(t), (t._version, *key), value
        return value


_LAST_CU = LastTensor()  # (number of sequences, longest) of the last cu_seqlens validated


def _cu_info(cu_seqlens: Tensor, batch: int, time: int) -> tuple[int, int]:
    """(number of sequences, longest sequence) of a cu_seqlens that passes the checks; read from the host once per
    tensor object and content version (a new tensor, or the same one changed in place, is read again)."""
    info = _LAST_CU.get(cu_seqlens, batch, time)
    if info is not None:
        return info
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [N+1] with N >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"cu_seqlens packs sequences along time and needs batch size 1, got batch={batch}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != time or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at time={time}, got {cu}")
    return _LAST_CU.put(cu_seqlens, (len(cu) - 1, max(b - a for a, b in zip(cu, cu[1:]))), batch, time)


_CASTS: dict[torch.dtype, LastTensor] = {}  # the last cast to each dtype


def cached_cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t.to(dtype)``, the same tensor object on every call with the same source tensor and content (per dtype).

    For the cu_seqlens every layer of a packed step passes: kernels that memoise their host-side index building by
    the identity of the tensor they are handed (fla) then build it once per step, not once per layer."""
    if t is None or t.dtype == dtype:
        return t
    last = _CASTS.setdefault(dtype, LastTensor())
    cast = last.get(t)
    return cast if cast is not None else last.put(t, t.to(dtype))


def check_cu_seqlens(cu_seqlens: Tensor | None, batch: int, time: int) -> int | None:
    """Validate varlen boundaries; return the number of sequences N (None without cu_seqlens)."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, Tensor):
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [N+1] with N >= 1, got {type(cu_seqlens).__name__}")
    return _cu_info(cu_seqlens, batch, time)[0]


def max_seqlen(cu_seqlens: Tensor | None, time: int) -> int:
    if cu_seqlens is None:
        return time
    return _cu_info(cu_seqlens, 1, time)[1]


def pick_mode(mode: str, cu_seqlens: Tensor | None, time: int) -> str:
    if mode != "auto":
        return mode
    return "recurrent" if max_seqlen(cu_seqlens, time) <= AUTO_RECURRENT_MAX_LEN else "chunk"


def resolve(op_name: str, backend: str | None, x: Tensor, **features) -> str:
    """The backend that runs this call ("torch" unless a faster one can and is allowed to)."""
    # Imported here: the backends package must never be a hard import-time dependency of the ops.
    from .backends import resolve_backend

    return resolve_backend(op_name, backend, x.device, x.dtype, **features)


def run_backend(name: str, op_name: str, *args, **kwargs):
    from .backends import get_backend

    return getattr(get_backend(name), op_name)(*args, **kwargs)
