"""Kernel backends for the linear-attention primitives, and the rule that picks one.

The public ops (`linear_moe.ops.gla`, `delta_rule`, `short_conv`, `gsa`, `norm_gate`) always have a pure-PyTorch
form (backend "torch"). On CUDA a faster backend can take over:

- "fla": flash-linear-attention's (fla-core 0.6.0) Triton kernels, wrapped by `backends/fla.py`
  to our layouts and conventions. On Hopper with Triton >= 3.4 and < 3.7.1 fla's own gated
  backward step (`chunk_bwd_dqkwg`, fla issue #640) is replaced by ours from
  `backends/triton/`, plugged into fla's backend dispatch, so gated primitives train there too.
- "triton": reserved for linear-moe's own fused chunk kernels. Not built yet: forcing it raises.

`resolve_backend` is the single place that decides. It never imports Triton or fla at module
import time, so this package imports on a CPU-only machine.
"""

from __future__ import annotations

import functools
import os
from importlib import import_module, metadata
from types import ModuleType

import torch

ENV_VAR = "LINEAR_MOE_KERNEL_BACKEND"
BACKENDS = ("torch", "fla", "triton")
OPS = ("gla", "delta_rule", "short_conv", "gsa", "norm_gate")
DECAY_KINDS = ("none", "constant", "scalar", "vector")

# fla's chunk kernels keep a [K, V] state tile per program; larger heads are not supported there.
FLA_MAX_HEAD_DIM = 256


# --- environment probes (small functions so tests can monkeypatch them) -----------------------

def _version_tuple(text: str) -> tuple[int, int, int]:
    """"3.6.0+git1234" -> (3, 6, 0); missing parts count as 0."""
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = ""
        for ch in piece:  # leading digits only: "0rc1" -> 0
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def _package_version(dist_name: str) -> str | None:
    """The installed version of ``dist_name`` (None if absent), read once per process: ``importlib.metadata`` scans
    the installed distributions on every call (~1 ms each), and every op call on a GPU asks through ``why_not``."""
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


_optional: dict[str, ModuleType | None] = {}


def optional_module(name: str) -> ModuleType | None:
    """The module ``name`` (e.g. one of our Triton kernel modules), or None when it does not import (no Triton
    on this machine); looked up once per process."""
    if name not in _optional:
        try:
            _optional[name] = import_module(name)
        except ImportError:
            _optional[name] = None
    return _optional[name]


def triton_version() -> str | None:
    """Installed Triton version, or None when Triton is not installed."""
    return _package_version("triton")


def fla_version() -> str | None:
    """Installed fla-core version, or None when fla is not installed."""
    return _package_version("fla-core") or _package_version("flash-linear-attention")


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device, or None for other devices / no CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def torch_forced() -> bool:
    """``LINEAR_MOE_KERNEL_BACKEND=torch``: every op keeps its PyTorch form, also those whose fast path is not a
    registered backend (packed attention's varlen kernel, our own Triton kernels)."""
    return os.environ.get(ENV_VAR) == "torch"


def fla_dispatch_disabled() -> bool:
    """fla bypasses its backend registry when this is set, so our fix could not be plugged in."""
    return os.environ.get("FLA_DISABLE_BACKEND_DISPATCH") == "1"


# --- known-bad combinations ---------------------------------------------------------------------

def hopper_dqkwg_bug(capability: tuple[int, int] | None, triton: str | None) -> bool:
    """True where fla's `chunk_bwd_dqkwg` is miscompiled (fla #640): sm_90, 3.4.0 <= Triton < 3.7.1.

    The bad pattern is a `tl.trans` of a matmul result that still sits in the Hopper wgmma
    accumulator layout, fed into another `tl.dot`; Triton 3.7.1 fixed the code generation.
    """
    if capability is None or capability[0] != 9 or triton is None:
        return False
    return (3, 4, 0) <= _version_tuple(triton) < (3, 7, 1)


# Our `chunk_bwd_dqkwg` (the #640 replacement) runs key tiles of at least 16 columns; it is float64-checked on the
# H100 in bf16 at k_dim 16 - 128 (tests/ops/test_backends_dqkwg.py). Its 4-warp launch configs were wrong in bf16
# and faulted while the autotuner timed them (first seen as Mamba2 with state_size=16, 2026-11-25 s8); they are
# gone. Narrower keys take the torch backend on the affected devices.
DQKWG_MIN_K_DIM = 16


def _uses_dqkwg_gated(op_name: str, decay: str) -> bool:
    # fla routes scalar-gated linear attention (chunk_simple_gla) and gated delta rule through
    # chunk_bwd_dqkwg with a gate; vector gates (chunk_gla, rwkv6) use their own kernels.
    return (op_name == "gla" and decay == "scalar") or (op_name == "delta_rule" and decay != "none")


def why_not(name: str, op_name: str, device: torch.device, dtype: torch.dtype | None,
            **features) -> str | None:
    """Why backend `name` cannot run `op_name` here, or None when it can.

    features (all optional): decay in DECAY_KINDS, bonus, normalize, requires_grad,
    k_dim, v_dim, m_dim, cu_seqlens (bool).
    """
    if name == "torch":
        return None
    if name == "triton":
        return ("linear-moe's own fused Triton chunk kernels are not built yet "
                "(ops/backends/triton/ only holds the gated backward step used by backend 'fla')")
    # name == "fla"
    if device.type != "cuda":
        return f"fla needs a CUDA device, got device {str(device)!r}"
    if not torch.cuda.is_available():
        return "fla needs CUDA, but torch.cuda.is_available() is False"
    if fla_version() is None:
        return "fla-core is not installed (pip install fla-core==0.6.0)"
    if triton_version() is None:
        return "triton is not installed"
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"fla supports float32/float16/bfloat16 inputs, got {dtype}"
    if op_name == "delta_rule" and dtype == torch.float32:
        return "fla 0.6.0's delta-rule kernels refuse float32 inputs (use bf16/fp16, or the torch backend)"
    for key in ("k_dim", "v_dim", "m_dim"):
        dim = features.get(key)
        if dim is not None and dim > FLA_MAX_HEAD_DIM:
            return f"fla supports head dims up to {FLA_MAX_HEAD_DIM}, got {key}={dim}"
    if op_name == "gsa" and dtype in (torch.float16, torch.bfloat16):
        odd = [f"{key}={features[key]}" for key in ("k_dim", "v_dim", "m_dim") if features.get(key, 0) % 2]
        if odd:  # gla pads odd widths with zero columns; chunk_gsa's softmax over the slots cannot take a pad slot
            return f"fla's 16-bit chunk_gsa needs even head and slot widths, got {', '.join(odd)}"
    if op_name == "gsa" and features.get("requires_grad", True) and 0 < features.get("m_dim", 16) <= 8:
        # chunk_gsa_bwd_kernel_dA multiplies tiles next_power_of_2(M) wide, and Triton's tl.dot needs 16 (the H100,
        # num_slots=8, 2026-11-25 s9: "Input shapes should have ... K >= 16"); the forward alone runs
        return ("fla's chunk_gsa backward needs more than 8 slots (Triton's matmul tiles), "
                f"got m_dim={features['m_dim']}")
    decay = features.get("decay", "none")
    if (features.get("requires_grad", True) and _uses_dqkwg_gated(op_name, decay)
            and hopper_dqkwg_bug(cuda_capability(device), triton_version())):
        if fla_dispatch_disabled():
            return ("known-bad: fla's gated chunk backward is miscompiled on Hopper with Triton "
                    f"{triton_version()} (fla issue #640), and FLA_DISABLE_BACKEND_DISPATCH=1 stops "
                    "linear-moe from plugging in its fixed kernel")
        k_dim = features.get("k_dim")
        if k_dim is not None and k_dim < DQKWG_MIN_K_DIM:
            return (f"linear-moe's replacement for fla's gated backward step (used on Hopper with Triton "
                    f"{triton_version()}) is checked for k_dim >= {DQKWG_MIN_K_DIM} only, got k_dim={k_dim}")
    return None


def _check_choice(value: str | None, where: str) -> str | None:
    if value is None or value == "auto" or value == "":
        return None
    if value not in BACKENDS:
        raise ValueError(f"{where}={value!r} is not a kernel backend; allowed: "
                         f"None, 'auto', {', '.join(repr(b) for b in BACKENDS)}")
    return value


def resolve_backend(op_name: str, backend: str | None = None, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None, **features) -> str:
    """Pick the kernel backend for one call of a public op.

    Args:
        op_name: one of OPS ("gla", "delta_rule", "short_conv", "gsa", "norm_gate").
        backend: None/"auto" chooses; "torch" | "fla" | "triton" forces one. When None/"auto",
            the env var LINEAR_MOE_KERNEL_BACKEND (if set) forces one instead.
        device, dtype: of the inputs.
        features: what the call needs (decay kind, bonus, normalize, requires_grad, k_dim,
            v_dim, m_dim (GSA's slots), cu_seqlens); see `why_not`.
    Returns:
        the backend name. A forced backend that cannot run raises RuntimeError naming why;
        "auto" picks "fla" on CUDA when it can run this call, else "torch".
    """
    if op_name not in OPS:
        raise ValueError(f"op_name={op_name!r} is unknown; allowed: {', '.join(OPS)}")
    decay = features.get("decay", "none")
    if decay not in DECAY_KINDS:
        raise ValueError(f"decay={decay!r} is unknown; allowed: {', '.join(DECAY_KINDS)}")
    device = torch.device(device)
    forced = _check_choice(backend, "backend")
    if forced is None:
        forced = _check_choice(os.environ.get(ENV_VAR), ENV_VAR)
    if forced is not None:
        reason = why_not(forced, op_name, device, dtype, **features)
        if reason is not None:
            raise RuntimeError(f"kernel backend {forced!r} cannot run {op_name}: {reason}")
        return forced
    if device.type != "cuda":
        return "torch"
    if why_not("fla", op_name, device, dtype, **features) is None:
        return "fla"
    return "torch"


def get_backend(name: str) -> ModuleType:
    """The module holding backend `name`'s op functions (`gla`, `delta_rule`, `short_conv`, `gsa`, `norm_gate`),
    each taking the public op's arguments. Imports fla/Triton only now."""
    if name == "fla":
        return import_module("linear_moe.ops.backends.fla")
    if name in BACKENDS:
        raise ValueError(f"backend {name!r} has no kernel module: 'torch' lives beside the public "
                         "ops and 'triton' is not built yet")
    raise ValueError(f"backend={name!r} is unknown; allowed: 'fla'")


__all__ = ["BACKENDS", "ENV_VAR", "OPS", "get_backend", "hopper_dqkwg_bug", "resolve_backend",
           "why_not"]
