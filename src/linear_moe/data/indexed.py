"""Megatron-compatible indexed token datasets: ``<prefix>.bin`` (tokens) + ``<prefix>.idx`` (index).

Written from the published layout of Megatron-LM's ``MMapIndexedDataset`` (no Megatron import),
so files prepared here train under Megatron and vice versa. The ``.idx`` file, little-endian:

    magic          9 bytes   b"MMIDIDX\\x00\\x00"
    version        uint64    1
    dtype code     uint8     token dtype of the .bin (DTYPE_CODES)
    n_sequences    uint64
    n_doc_index    uint64    number of entries in doc_index (= documents + 1)
    lengths        int32  [n_sequences]   tokens per sequence
    pointers       int64  [n_sequences]   byte offset of each sequence in the .bin
    doc_index      int64  [n_doc_index]   sequence index where each document starts; last = n_sequences
    (modes         int8   [n_sequences]   only in multimodal files; ignored here)

The ``.bin`` is every sequence's tokens back to back. We write one sequence per document, as
Megatron's ``preprocess_data.py`` does without sentence splitting.
"""
from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n_sequences, n_doc_index

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dt: code for code, dt in DTYPE_CODES.items()}


def index_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 for vocabularies below 65500, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def _code(dtype) -> int:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in CODE_OF_DTYPE:
        allowed = ", ".join(str(d) for d in CODE_OF_DTYPE)
        raise DataError(f"dtype {dtype!r} cannot be stored in an indexed dataset; allowed: {allowed}")
    return CODE_OF_DTYPE[dt]


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_index(path: Path, dtype: np.dtype, lengths: np.ndarray, doc_index: np.ndarray) -> None:
    """Write a ``.idx`` for sequences of ``lengths`` tokens stored back to back (atomically)."""
    lengths = np.asarray(lengths, dtype=np.int32)
    doc_index = np.asarray(doc_index, dtype=np.int64)
    pointers = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, _code(dtype), lengths.size, doc_index.size))
        for arr in (lengths, pointers, doc_index):
            f.write(arr.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class IndexedDatasetWriter:
    """Streams documents into ``<prefix>.bin`` / ``<prefix>.idx``; nothing appears under the final
    names until ``close()`` succeeds (the ``.idx``, renamed last, marks a complete dataset).

        with IndexedDatasetWriter("data/wiki", np.uint16) as w:
            w.add_document(token_ids)
    """

    def __init__(self, prefix: str | Path, dtype=np.uint16):
        self.prefix = Path(prefix)
        _code(dtype)
        self.dtype = np.dtype(dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = _tmp(bin_path(prefix))
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[int] = []
        self._doc_index: list[int] = [0]

    def add_sequence(self, tokens) -> None:
        """Append one sequence (1-D ids) to the current document."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise DataError(f"a sequence must be 1-D token ids, got shape {arr.shape}")
        if arr.size and np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise DataError(f"token ids in [{arr.min()}, {arr.max()}] do not fit dtype {self.dtype}")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(arr.size)

    def end_document(self) -> None:
        self._doc_index.append(len(self._lengths))

    def add_document(self, tokens) -> None:
        """One document stored as one sequence."""
        self.add_sequence(tokens)
        self.end_document()

    def close(self) -> None:
        if self._bin.closed:
            return
        if self._doc_index[-1] != len(self._lengths):  # sequences added after the last end_document
            self.end_document()
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        os.replace(self._bin_tmp, bin_path(self.prefix))
        write_index(idx_path(self.prefix), self.dtype, np.array(self._lengths), np.array(self._doc_index))

    def abort(self) -> None:
        """Drop everything written so far (used when an error interrupts a build)."""
        if not self._bin.closed:
            self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_indexed_dataset(prefix: str | Path, documents: Iterable, dtype=np.uint16) -> None:
    """Write ``documents`` (each a 1-D sequence of ids) as a Megatron indexed dataset."""
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in documents:
            w.add_document(doc)


class IndexedDataset:
    """A read-only, memory-mapped Megatron indexed dataset; every field is checked on open.

    ``ds[i]`` is sequence ``i`` as a 1-D array view ``[length_i]``; ``ds.tokens`` is the whole
    ``.bin`` as one flat array ``[num_tokens]``; ``ds.document(j)`` concatenates document ``j``.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not p.is_file():
                raise DataError(f"indexed dataset file {str(p)!r} does not exist")
        self._read_index(ipath)
        size = bpath.stat().st_size
        expected = self.num_tokens * self.dtype.itemsize
        if size != expected:
            raise DataError(f"{str(bpath)!r} is {size} bytes but its index describes {expected} "
                            f"({self.num_tokens} {self.dtype} tokens): truncated or mismatched")
        self.tokens = (np.memmap(bpath, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
                       if self.num_tokens else np.zeros(0, self.dtype))

    def _read_index(self, path: Path) -> None:
        raw = path.read_bytes()
        bad = f"index file {str(path)!r}"
        if len(raw) < _HEADER.size:
            raise DataError(f"{bad} is {len(raw)} bytes, shorter than the {_HEADER.size}-byte header (truncated?)")
        magic, version, code, n_seq, n_doc = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise DataError(f"{bad} does not start with the Megatron magic {MAGIC!r} (got {magic!r})")
        if version != VERSION:
            raise DataError(f"{bad} has version {version}; only version {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise DataError(f"{bad} has unknown dtype code {code}; allowed: {sorted(DTYPE_CODES)}")
        body = 4 * n_seq + 8 * n_seq + 8 * n_doc
        if len(raw) not in (_HEADER.size + body, _HEADER.size + body + n_seq):  # + optional modes
            raise DataError(f"{bad} is {len(raw)} bytes but its header ({n_seq} sequences, {n_doc} "
                            f"doc-index entries) needs {_HEADER.size + body} (truncated or corrupt)")
        self.dtype = DTYPE_CODES[code]
        off = _HEADER.size
        self.lengths = np.frombuffer(raw, np.int32, n_seq, off)
        self.pointers = np.frombuffer(raw, np.int64, n_seq, off + 4 * n_seq)
        self.doc_index = np.frombuffer(raw, np.int64, n_doc, off + 12 * n_seq)
        if n_seq and self.lengths.min() < 0:
            raise DataError(f"{bad} has a negative sequence length")
        starts = np.zeros(n_seq, dtype=np.int64)
        np.cumsum(self.lengths[:-1], dtype=np.int64, out=starts[1:])
        if not np.array_equal(self.pointers, starts * self.dtype.itemsize):
            raise DataError(f"{bad} has sequence pointers that do not match its lengths (corrupt)")
        if n_doc < 1 or self.doc_index[0] != 0 or self.doc_index[-1] != n_seq or np.any(np.diff(self.doc_index) < 0):
            raise DataError(f"{bad} has a malformed document index (must rise from 0 to {n_seq})")
        self.offsets = starts  # token offset of each sequence in .bin
        self.num_tokens = int(self.lengths.sum(dtype=np.int64))

    def __len__(self) -> int:
        return self.lengths.size

    @property
    def num_documents(self) -> int:
        return self.doc_index.size - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        i %= len(self)
        start = self.offsets[i]
        return self.tokens[start:start + self.lengths[i]]

    def document(self, j: int) -> np.ndarray:
        """All sequences of document ``j``, concatenated: ``[doc_length]``."""
        if not 0 <= j < self.num_documents:
            raise IndexError(f"document {j} out of range for {self.num_documents} documents")
        lo, hi = self.doc_index[j], self.doc_index[j + 1]
        if lo == hi:
            return self.tokens[:0]
        start = self.offsets[lo]
        return self.tokens[start:self.offsets[hi - 1] + self.lengths[hi - 1]]

    def __repr__(self) -> str:
        return (f"IndexedDataset({str(self.prefix)!r}, sequences={len(self)}, "
                f"documents={self.num_documents}, tokens={self.num_tokens}, dtype={self.dtype})")


def merge_indexed_datasets(prefixes: list[str | Path], out_prefix: str | Path) -> None:
    """Concatenate datasets (same dtype) into ``out_prefix``, in order; written atomically."""
    parts = [IndexedDataset(p) for p in prefixes]
    if not parts:
        raise DataError("merge_indexed_datasets needs at least one input prefix")
    dtype = parts[0].dtype
    for p in parts[1:]:
        if p.dtype != dtype:
            raise DataError(f"cannot merge {str(p.prefix)!r} ({p.dtype}) with {str(parts[0].prefix)!r} ({dtype})")
    out_bin = bin_path(out_prefix)
    tmp = _tmp(out_bin)
    with open(tmp, "wb") as f:
        for p in parts:  # raw byte copy: never holds a whole part in memory
            with open(bin_path(p.prefix), "rb") as src:
                shutil.copyfileobj(src, f, 16 << 20)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_bin)
    lengths = np.concatenate([p.lengths for p in parts])
    doc_index, base = [np.zeros(1, np.int64)], 0
    for p in parts:
        doc_index.append(p.doc_index[1:] + base)
        base += len(p)
    write_index(idx_path(out_prefix), dtype, lengths, np.concatenate(doc_index))
