"""A tiny real dataset for tests anywhere in the project: the corpus' first 300k characters.

``tiny_dataset()`` builds it once per process (about a second) in a temporary directory removed
at exit; tests in every folder can call it freely. Pass ``root`` to build somewhere specific.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from .token_cache import DatasetInfo, prepare_default_dataset

TINY_MAX_CHARS = 300_000
TINY_VOCAB = 1024

_built: dict[tuple, DatasetInfo] = {}
_tmp_root: Path | None = None


def _shared_root() -> Path:
    global _tmp_root
    if _tmp_root is None:
        _tmp_root = Path(tempfile.mkdtemp(prefix="linear-moe-tiny-"))
        atexit.register(shutil.rmtree, _tmp_root, ignore_errors=True)
    return _tmp_root


def tiny_dataset(root: str | Path | None = None, vocab_size: int = TINY_VOCAB,
                 max_chars: int = TINY_MAX_CHARS) -> DatasetInfo:
    """A small train/val token cache of real text (~90k train tokens at the defaults)."""
    key = (str(root) if root is not None else None, vocab_size, max_chars)
    info = _built.get(key)
    if info is None or not info.train_path.is_file():
        info = prepare_default_dataset(root if root is not None else _shared_root(),
                                       vocab_size=vocab_size, max_chars=max_chars)
        _built[key] = info
    return info
