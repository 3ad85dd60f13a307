"""Tokenize a corpus once into memory-mappable ``train.bin`` / ``val.bin`` files, and reuse them.

A cache directory holds ``tokenizer.json``, ``train.bin``, ``val.bin`` (flat token ids,
documents joined by EOS, uint16 when the vocabulary fits else uint32) and ``meta.json``.
``meta.json`` is written last, so its presence marks a finished build; every file is written to a
temporary name and renamed, so a crash never leaves a half-written file under a final name.
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .corpus import CORPUS_SOURCES, DEFAULT_CORPUS, iter_documents
from .errors import DataError
from .tokenizer import Tokenizer, load_tokenizer, train_bpe_tokenizer

FORMAT_VERSION = 1
VAL_EVERY = 50  # every 50th document is held out: a 2% validation split spread over the corpus


@dataclass(frozen=True)
class DatasetInfo:
    """Where a prepared dataset lives and how big it is."""
    cache_dir: Path
    train_path: Path
    val_path: Path
    tokenizer_path: Path
    vocab_size: int              # tokenizer ids (all token ids are < vocab_size)
    eos_id: int
    train_tokens: int
    val_tokens: int
    dtype: str                   # "uint16" or "uint32"
    corpus_id: str
    meta: dict[str, Any]


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def default_cache_root() -> Path:
    """``$LINEAR_MOE_CACHE`` if set, else ``~/.cache/linear-moe``."""
    env = os.environ.get("LINEAR_MOE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "linear-moe"


def atomic_write_bytes(path: Path, data: bytes | np.ndarray) -> None:
    """Write to a temporary sibling, fsync, then rename over ``path`` (all or nothing)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.tobytes() if isinstance(data, np.ndarray) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_meta(path: Path) -> dict[str, Any]:
    """Parse a ``meta.json``; DataError if it is missing or not a JSON object."""
    if not path.is_file():
        raise DataError(f"meta file {str(path)!r} does not exist")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"meta file {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise DataError(f"meta file {str(path)!r} must hold a JSON object, got {type(meta).__name__}")
    return meta


def open_tokens(bin_path: str | Path, dtype: str | np.dtype | None = None) -> np.memmap:
    """Memory-map a flat token file. ``dtype`` defaults to the one recorded in the sibling meta.json.

    Returns a read-only 1-D array ``[num_tokens]``; checks the size matches the meta's count.
    """
    path = Path(bin_path)
    if not path.is_file():
        raise DataError(f"token file {str(path)!r} does not exist")
    expected = None
    if dtype is None:
        meta = read_meta(path.with_name("meta.json"))
        if "dtype" not in meta:
            raise DataError(f"meta file {str(path.with_name('meta.json'))!r} has no 'dtype' field")
        dtype = meta["dtype"]
        files = meta.get("files")
        entry = files.get(path.name) if isinstance(files, dict) else None
        expected = entry.get("tokens") if isinstance(entry, dict) else None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise DataError(f"token file {str(path)!r}: unknown dtype {dtype!r}; allowed: uint16, uint32") from None
    if dt not in (np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.int32), np.dtype(np.int64)):
        raise DataError(f"token file {str(path)!r}: dtype {dt} is not a token dtype; allowed: uint16, uint32, int32, int64")
    size = path.stat().st_size
    if size % dt.itemsize:
        raise DataError(f"token file {str(path)!r} is {size} bytes, not a whole number of {dt} tokens (truncated?)")
    n = size // dt.itemsize
    if expected is not None and n != expected:
        raise DataError(f"token file {str(path)!r} holds {n} tokens but meta.json says {expected} (truncated or stale)")
    if n == 0:
        raise DataError(f"token file {str(path)!r} is empty")
    return np.memmap(path, dtype=dt, mode="r", shape=(n,))


@contextmanager
def _build_lock(directory: Path):
    """Serialize builders of one cache dir (e.g. several ranks starting at once)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _info_from_meta(directory: Path, meta: dict[str, Any]) -> DatasetInfo:
    return DatasetInfo(
        cache_dir=directory, train_path=directory / "train.bin", val_path=directory / "val.bin",
        tokenizer_path=directory / "tokenizer.json", vocab_size=meta["vocab_size"],
        eos_id=meta["eos_id"], train_tokens=meta["files"]["train.bin"]["tokens"],
        val_tokens=meta["files"]["val.bin"]["tokens"], dtype=meta["dtype"],
        corpus_id=meta["corpus_id"], meta=meta)


def _cached(directory: Path, wanted: dict[str, Any]) -> DatasetInfo | None:
    """The finished build in ``directory`` if it matches ``wanted`` and its files check out, else None."""
    try:
        meta = read_meta(directory / "meta.json")
        if any(meta.get(k) != v for k, v in wanted.items()):
            return None
        tok = load_tokenizer(directory / "tokenizer.json")
        if tok.sha256 != meta.get("tokenizer_sha256"):
            return None
        for name in ("train.bin", "val.bin"):
            open_tokens(directory / name)
        return _info_from_meta(directory, meta)
    except (DataError, KeyError, TypeError):
        return None  # missing, corrupt or stale: the caller rebuilds


def _split(docs: list[str]) -> tuple[list[str], list[str]]:
    val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    if not val:  # a tiny slice with fewer than VAL_EVERY documents: hold out the last one
        train, val = docs[:-1], docs[-1:]
    return train, val


def _tokenize(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """Documents joined by EOS (one after each document), as the cache dtype."""
    ids = tok.encode_batch(docs)
    out = np.empty(sum(len(x) + 1 for x in ids), dtype=token_dtype(tok.vocab_size))
    pos = 0
    for x in ids:
        out[pos:pos + len(x)] = x
        out[pos + len(x)] = tok.eos_id
        pos += len(x) + 1
    return out


def prepare_default_dataset(cache_dir: str | Path | None = None, vocab_size: int = 4096,
                            max_chars: int | None = None, corpus: str = DEFAULT_CORPUS,
                            tokenizer: str | Path | None = None) -> DatasetInfo:
    """Build (once) or reuse the tokenized default corpus; returns paths and counts.

    The dataset lives in ``<cache_dir or default_cache_root()>/<corpus>[-c<max_chars>]-v<vocab>``
    (``-t<hash>`` instead of ``-v<vocab>`` with a given ``tokenizer``). Without ``tokenizer`` a
    byte-level BPE with ``vocab_size`` ids is trained on the training documents. ``max_chars``
    keeps only the corpus' first N characters (tests use ~300k: a build of a second or two).
    A cache whose meta, tokenizer or file sizes do not match is rebuilt.
    """
    if max_chars is not None and max_chars <= 0:
        max_chars = None  # DataConfig uses 0 for "all"
    root = Path(cache_dir) if cache_dir else default_cache_root()
    tok_src = Path(tokenizer) if tokenizer else None
    if tok_src is not None and tok_src.is_dir():
        tok_src = tok_src / "tokenizer.json"
    given = load_tokenizer(tok_src) if tok_src else None
    corpus_id = corpus + (f"-c{max_chars}" if max_chars else "")
    name = f"{corpus_id}-t{given.sha256[:12]}" if given else f"{corpus_id}-v{vocab_size}"
    directory = root / name
    wanted: dict[str, Any] = {"format_version": FORMAT_VERSION, "corpus_id": corpus_id}
    if given:
        wanted["tokenizer_sha256"] = given.sha256
    else:
        wanted["requested_vocab_size"] = vocab_size
    if (info := _cached(directory, wanted)) is not None:
        return info
    with _build_lock(directory):
        if (info := _cached(directory, wanted)) is not None:  # another process built it meanwhile
            return info
        # Drop the old commit marker first: a crash mid-rebuild must not leave a stale meta.json
        # vouching for half-replaced files.
        (directory / "meta.json").unlink(missing_ok=True)
        docs = list(iter_documents(corpus, max_chars))
        if len(docs) < 2:
            raise DataError(f"corpus {corpus_id!r} has {len(docs)} document(s); need at least 2 for a train/val split")
        train_docs, val_docs = _split(docs)
        tok_path = directory / "tokenizer.json"
        if tok_src is not None:
            atomic_write_bytes(tok_path, tok_src.read_bytes())
            config = tok_src.with_name("tokenizer_config.json")  # names the special tokens, if any
            if config.is_file():
                atomic_write_bytes(directory / config.name, config.read_bytes())
            tok = load_tokenizer(tok_path)
        else:
            tok = train_bpe_tokenizer(train_docs, vocab_size, tok_path)
        train, val = _tokenize(tok, train_docs), _tokenize(tok, val_docs)
        atomic_write_bytes(directory / "train.bin", train)
        atomic_write_bytes(directory / "val.bin", val)
        meta = {
            **wanted, "corpus": corpus, "corpus_source": CORPUS_SOURCES.get(corpus, corpus),
            "max_chars": max_chars, "requested_vocab_size": None if given else vocab_size,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
            "tokenizer_sha256": tok.sha256, "dtype": str(train.dtype),
            "files": {"train.bin": {"tokens": int(train.size), "documents": len(train_docs)},
                      "val.bin": {"tokens": int(val.size), "documents": len(val_docs)}},
        }
        atomic_write_bytes(directory / "meta.json", json.dumps(meta, indent=2).encode())
        return _info_from_meta(directory, meta)
