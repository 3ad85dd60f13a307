"""Triton autotuning results that ship with the package, so fla's kernels start tuned on a known GPU stack.

fla's Triton kernels autotune on first use: each compiles and times a dozen or more configurations, 1-3 minutes
per mixer on a fresh H100 (Gated DeltaNet 147 s, GLA 118 s, GSA 194 s measured there). Triton keeps each result
as a small ``<kernel>.autotune.json`` in its cache directory, under a hash of the kernel's source, the Triton
build, the GPU architecture and the tuning key (head count, head dims, dtypes: not the sequence length), so a
result measured on one machine is found on another with the same stack. ``autotune_results/`` holds those
measured on the H100 for the shapes of the presets, the benchmarks and the GPU tests (``benchmarks/warm_kernels.py
--pack`` makes such a file).

On the first fla op on CUDA, :func:`seed_triton_cache` copies the results for the device's architecture and the
installed Triton / fla into Triton's cache directory, never replacing a file that is there (the user's own
tuning wins). Kernels and shapes without a shipped result tune as before. ``LINEAR_MOE_FLA_TUNING=0`` turns
it off.
"""
from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent / "autotune_results"
# (GPU architecture major version, Triton version, fla version) -> the tarball measured on that stack
SHIPPED = {(9, "3.6.0", "0.6.0"): "sm90-triton3.6.0-fla0.6.0.tgz"}
ENV_VAR = "LINEAR_MOE_FLA_TUNING"

_seeded: dict[tuple, int] = {}


def triton_cache_dir() -> Path:
    """Triton's cache directory (``TRITON_CACHE_DIR``, else ``~/.triton/cache``)."""
    try:
        from triton import knobs
        return Path(knobs.cache.dir)
    except (ImportError, AttributeError):  # an older Triton without knobs
        return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def unpack_autotune_results(tarball: Path, cache_dir: Path, overwrite: bool = False) -> int:
    """Write the ``*.autotune.json`` members of ``tarball`` (paths ``<hash>/<kernel>.autotune.json``) under
    ``cache_dir``; each file appears whole (written beside, then renamed), so a process reading the cache never
    sees half a file. Members with other names or paths leaving the folder are skipped. Returns how many
    files were written."""
    written = 0
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if (not member.isfile() or not member.name.endswith(".autotune.json") or len(parts) != 2
                    or Path(member.name).is_absolute() or ".." in parts):
                continue
            target = cache_dir / member.name
            if target.exists() and not overwrite:
                continue
            data = tar.extractfile(member).read()
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".seed-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
            written += 1
    return written


def shipped_tarball(capability: tuple[int, int] | None, triton: str | None, fla: str | None) -> Path | None:
    """The shipped results for this stack, or None (another GPU architecture or version, or none shipped)."""
    if capability is None:
        return None
    name = SHIPPED.get((capability[0], triton, fla))
    return SHIPPED_DIR / name if name and (SHIPPED_DIR / name).is_file() else None


def seed_triton_cache(capability: tuple[int, int] | None, triton: str | None, fla: str | None,
                      cache_dir: Path | None = None) -> int:
    """Copy the shipped autotuning results for this stack into Triton's cache (once per process and folder);
    returns how many files were added (0 when off, nothing matches, or everything was there)."""
    setting = os.environ.get(ENV_VAR, "1")
    if setting not in ("0", "1"):
        raise ValueError(f"{ENV_VAR}={setting!r} is not understood; allowed: '1' (seed Triton's cache with the "
                         "shipped autotuning results, the default) or '0' (leave it alone)")
    tarball = shipped_tarball(capability, triton, fla) if setting == "1" else None
    if tarball is None:
        return 0
    folder = cache_dir or triton_cache_dir()
    key = (str(tarball), str(folder))
    if key not in _seeded:
        try:
            _seeded[key] = unpack_autotune_results(tarball, folder)
        except (OSError, tarfile.TarError):  # a read-only or full cache folder, a damaged file: tune as before
            _seeded[key] = 0
    return _seeded[key]
