"""Which code a benchmark ran: the commit and a digest of the package's sources, written into every results file.

The device machine runs a copy of the working tree whose git metadata lags its files (on 2026-11-25 every call
reported the session's first commit), so ``GIT_COMMIT`` in the environment wins over git's HEAD: pass it on the
device command line (``GIT_COMMIT=<hash> PARTS=... bash benchmarks/gpu_session.sh``). The source digest identifies
the code either way; recompute it on a checkout to match a commit.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """``GIT_COMMIT`` when set, else git's HEAD of this checkout, else ''."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return ""


def source_digest() -> str:
    """First 16 hex digits of the sha256 over ``src/``'s Python files (relative path and bytes, in sorted order)."""
    h = hashlib.sha256()
    src = ROOT / "src"
    for f in sorted(src.rglob("*.py")):
        h.update(str(f.relative_to(src)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]
