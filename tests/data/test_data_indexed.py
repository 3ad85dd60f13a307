import struct

import numpy as np
import pytest

from linear_moe.data import DataError
from linear_moe.data.indexed import (DTYPE_CODES, IndexedDataset, IndexedDatasetWriter,
                                     merge_indexed_datasets, write_indexed_dataset)

INT_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16]


def _random_docs(rng, dtype, n=None):
    info = np.iinfo(dtype)
    hi = min(int(info.max), 50_000) + 1
    lo = max(int(info.min), -1000)
    n = n if n is not None else int(rng.integers(1, 12))
    return [rng.integers(lo, hi, size=int(rng.integers(0, 40))).astype(dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype", INT_DTYPES + [np.float32, np.float64])
def test_round_trip_each_dtype(tmp_path, dtype):
    rng = np.random.default_rng()
    if np.issubdtype(dtype, np.integer):
        docs = _random_docs(rng, dtype)
    else:
        docs = [rng.standard_normal(int(rng.integers(0, 20))).astype(dtype) for _ in range(5)]
    write_indexed_dataset(tmp_path / "d", docs, dtype)
    ds = IndexedDataset(tmp_path / "d")
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == ds.num_documents == len(docs)
    assert ds.num_tokens == sum(d.size for d in docs)
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d) and np.array_equal(ds.document(i), d)
    assert np.array_equal(ds.tokens, np.concatenate(docs)) if docs else True


def test_layout_matches_megatron_spec(tmp_path):
    """Build the expected bytes independently from the published layout and compare."""
    docs = [np.array([5, 6, 7], np.int32), np.array([9], np.int32)]
    with IndexedDatasetWriter(tmp_path / "d", np.int32) as w:
        w.add_sequence(docs[0][:2])
        w.add_sequence(docs[0][2:])  # document 0 = two sequences
        w.end_document()
        w.add_document(docs[1])
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4)
                + struct.pack("<Q", 3) + struct.pack("<Q", 3)
                + struct.pack("<3i", 2, 1, 1) + struct.pack("<3q", 0, 8, 12) + struct.pack("<3q", 0, 2, 3))
    assert (tmp_path / "d.idx").read_bytes() == expected
    assert (tmp_path / "d.bin").read_bytes() == np.array([5, 6, 7, 9], "<i4").tobytes()
    ds = IndexedDataset(tmp_path / "d")
    assert len(ds) == 3 and ds.num_documents == 2
    assert ds.document(0).tolist() == [5, 6, 7] and ds[1].tolist() == [7]
    assert DTYPE_CODES[8] == np.uint16 and DTYPE_CODES[4] == np.int32


def test_merge_concatenates_in_order(tmp_path):
    rng = np.random.default_rng()
    a, b = _random_docs(rng, np.uint16, 4), _random_docs(rng, np.uint16, 3)
    write_indexed_dataset(tmp_path / "a", a)
    write_indexed_dataset(tmp_path / "b", b)
    merge_indexed_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    m = IndexedDataset(tmp_path / "m")
    assert m.num_documents == 7
    assert all(np.array_equal(m.document(i), d) for i, d in enumerate(a + b))
    write_indexed_dataset(tmp_path / "c", [np.arange(3)], np.int32)
    with pytest.raises(DataError, match="cannot merge"):
        merge_indexed_datasets([tmp_path / "a", tmp_path / "c"], tmp_path / "m2")


def _corrupt(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        return bytes(raw[:-5])
    if how == "short_header":
        return bytes(raw[:20])
    if how == "magic":
        raw[0:3] = b"XYZ"
    elif how == "version":
        raw[9:17] = struct.pack("<Q", 2)
    elif how == "dtype":
        raw[17] = 42
    elif how == "pointers":
        raw[34 + 4 * 3 + 8] ^= 0xFF  # second pointer of 3 sequences
    elif how == "doc_index":
        raw[-8:] = struct.pack("<q", 99)
    return bytes(raw)


@pytest.mark.parametrize("how,match", [
    ("truncated", "truncated or corrupt"), ("short_header", "shorter than"), ("magic", "magic"),
    ("version", "version 2"), ("dtype", "dtype code 42"), ("pointers", "pointers"),
    ("doc_index", "document index"),
])
def test_corrupt_index_rejected(tmp_path, how, match):
    write_indexed_dataset(tmp_path / "d", [np.arange(4), np.arange(2), np.arange(5)], np.uint16)
    idx = tmp_path / "d.idx"
    idx.write_bytes(_corrupt(idx, how))
    with pytest.raises(DataError, match=match):
        IndexedDataset(tmp_path / "d")


def test_bad_bin_and_missing_files(tmp_path):
    write_indexed_dataset(tmp_path / "d", [np.arange(4)], np.uint16)
    (tmp_path / "d.bin").write_bytes(b"\x00" * 6)
    with pytest.raises(DataError, match="truncated or mismatched"):
        IndexedDataset(tmp_path / "d")
    with pytest.raises(DataError, match="does not exist"):
        IndexedDataset(tmp_path / "nope")
    with pytest.raises(DataError, match="do not fit dtype uint8"):
        write_indexed_dataset(tmp_path / "e", [np.array([300])], np.uint8)
    assert not (tmp_path / "e.bin").exists() and not list(tmp_path.glob(".e.bin.tmp-*"))
    with pytest.raises(DataError, match="cannot be stored"):
        IndexedDatasetWriter(tmp_path / "f", np.complex64)


def test_byte_identical_to_megatron_core(tmp_path):
    """Only where megatron-core is importable (not a dependency; checked by hand with 0.16.1)."""
    mi = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    import torch
    for dtype in INT_DTYPES:
        docs = _random_docs(np.random.default_rng(), dtype, 9)
        write_indexed_dataset(tmp_path / "ours", docs, dtype)
        theirs = mi.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
        for d in docs:
            theirs.add_item(torch.from_numpy(d.astype(np.int64)))
            theirs.end_document()
        theirs.finalize(str(tmp_path / "theirs.idx"))
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes(), dtype
        m = mi.IndexedDataset(str(tmp_path / "ours"))
        assert all(np.array_equal(m[i], d) for i, d in enumerate(docs)), dtype
