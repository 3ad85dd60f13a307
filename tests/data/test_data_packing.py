import numpy as np
import pytest
import torch

from linear_moe.data import TokenBatcher
from linear_moe.data.packing import IGNORE_INDEX, pack_windows
from linear_moe.data.testing import tiny_dataset

EOS = 0


def _stream(rng, n_docs):
    """Documents of random length (some empty) over ids 1..49, each closed by EOS; returns the
    stream and, per stream position, (document id, offset within the document)."""
    toks, doc_of, off_of = [], [], []
    for d in range(n_docs):
        n = int(rng.integers(0, 12))
        for j, t in enumerate(list(rng.integers(1, 50, size=n)) + [EOS]):
            toks.append(int(t)), doc_of.append(d), off_of.append(j)
    return np.array(toks), np.array(doc_of), np.array(off_of)


def _reference(windows, eos):
    """Step-by-step float-free reference: walk each row, cut after every EOS and at row ends."""
    b, t1 = windows.shape
    cu, pos, labels = [0], np.zeros((b, t1 - 1), int), np.zeros((b, t1 - 1), int)
    for r in range(b):
        p = 0
        for i in range(t1 - 1):
            if i > 0 and windows[r, i - 1] == eos:
                cu.append(r * (t1 - 1) + i)
                p = 0
            pos[r, i] = p
            p += 1
            labels[r, i] = IGNORE_INDEX if windows[r, i] == eos else windows[r, i + 1]
        cu.append((r + 1) * (t1 - 1))
    return cu, pos, labels


def test_cu_seqlens_positions_labels_match_reference():
    rng = np.random.default_rng()
    stream, doc_of, off_of = _stream(rng, 60)
    T, B = int(rng.integers(4, 24)), 5
    starts = rng.integers(0, stream.size - T - 1, size=B)
    windows = np.stack([stream[s:s + T + 1] for s in starts])
    packed = pack_windows(torch.from_numpy(windows), EOS)
    cu, pos, labels = _reference(windows, EOS)
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == cu
    assert torch.equal(packed.position_ids, torch.from_numpy(pos))
    assert torch.equal(packed.labels, torch.from_numpy(labels))
    assert packed.max_seqlen == max(np.diff(cu))
    # Every segment is one piece of one document; positions equal the document offset whenever
    # the segment starts at the document's beginning.
    flat_doc = np.stack([doc_of[s:s + T] for s in starts]).reshape(-1)
    flat_off = np.stack([off_of[s:s + T] for s in starts]).reshape(-1)
    flat_pos = packed.position_ids.reshape(-1).numpy()
    for a, e in zip(cu[:-1], cu[1:]):
        assert len(set(flat_doc[a:e])) == 1
        if flat_off[a] == 0:
            assert np.array_equal(flat_pos[a:e], flat_off[a:e])
    # ... and no two neighbouring segments in a row belong to the same document.
    for a in cu[1:-1]:
        if a % T:
            assert flat_doc[a] != flat_doc[a - 1]


def test_segment_sums_through_cu_seqlens():
    """A varlen op driven by cu_seqlens (a per-document running sum) matches per-document math."""
    stream = torch.tensor([3, 4, EOS, 5, EOS, 6, 7, 8, EOS, 9, 9])
    packed = pack_windows(stream[None, :], EOS)
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 9, 10]
    flat = packed.input_ids.flatten()
    cu = packed.cu_seqlens.tolist()
    running = torch.cat([flat[a:e].cumsum(0) for a, e in zip(cu[:-1], cu[1:])])
    assert running.tolist() == [3, 7, 7, 5, 5, 6, 13, 21, 21, 9]
    assert packed.labels.tolist() == [[4, EOS, IGNORE_INDEX, EOS, IGNORE_INDEX, 7, 8, EOS, IGNORE_INDEX, 9]]
    two = pack_windows(torch.stack([stream, stream]), EOS).flatten()
    assert two.input_ids.shape == two.labels.shape == two.position_ids.shape == (1, 20)
    assert two.cu_seqlens.tolist() == [0, 3, 5, 9, 10, 13, 15, 19, 20]


def test_token_batcher_packed_batch_matches_plain_batch():
    info = tiny_dataset()
    b = TokenBatcher.from_info(info, seq_len=64, batch_size=3, seed=int(np.random.randint(1 << 30)))
    x, y = b.batch(4)
    p = b.packed_batch(4, info.eos_id)
    assert torch.equal(p.input_ids, x)
    keep = p.labels != IGNORE_INDEX
    assert torch.equal(p.labels[keep], y[keep]) and torch.all(x[~keep] == info.eos_id)
    assert p.cu_seqlens[-1] == 3 * 64 and p.cu_seqlens[0] == 0


def test_rejects_bad_shape():
    with pytest.raises(ValueError, match="windows must be"):
        pack_windows(torch.zeros(5, dtype=torch.long), EOS)
