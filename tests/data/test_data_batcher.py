import numpy as np
import pytest
import torch

from linear_moe.data import DataError, TokenBatcher, open_tokens
from linear_moe.data.testing import tiny_dataset


def _contains_window(tokens: np.ndarray, row: torch.Tensor) -> bool:
    n = row.numel()
    starts = np.flatnonzero(tokens[: tokens.size - n + 1] == int(row[0]))
    return any(np.array_equal(tokens[s:s + n], row.numpy()) for s in starts)


def test_batches_are_shifted_windows_of_the_file():
    info = tiny_dataset()
    b = TokenBatcher.from_info(info, seq_len=32, batch_size=4, seed=int(np.random.randint(1 << 30)))
    x, y = b.batch(0)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    train = np.asarray(open_tokens(info.train_path))
    full = torch.cat([x, y[:, -1:]], dim=1)
    assert all(_contains_window(train, row) for row in full)
    assert int(x.max()) < info.vocab_size


def test_deterministic_by_step_and_resumable():
    info = tiny_dataset()
    seed = int(np.random.randint(1 << 30))
    run = TokenBatcher.from_info(info, 16, 3, seed)
    first = [run.batch(s) for s in range(5)]
    resumed = TokenBatcher.from_info(info, 16, 3, seed)  # a fresh loader "after a restart"
    for s in (3, 4):
        assert all(torch.equal(a, b) for a, b in zip(resumed.batch(s), first[s]))
    assert not torch.equal(first[0][0], first[1][0])
    other = TokenBatcher.from_info(info, 16, 3, seed + 1)
    assert not torch.equal(other.batch(0)[0], first[0][0])


def test_ranks_split_one_global_batch():
    info = tiny_dataset()
    whole = TokenBatcher.from_info(info, 8, 6, seed=7).batch(2)[0]
    parts = [TokenBatcher.from_info(info, 8, 3, seed=7, rank=r, world_size=2).batch(2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)


def test_eval_batches_are_sequential_and_deterministic():
    info = tiny_dataset()
    b = TokenBatcher.from_info(info, seq_len=64, batch_size=2, seed=0)
    val = torch.from_numpy(np.asarray(open_tokens(info.val_path)).astype(np.int64))
    got = list(b.eval_batches(3))
    assert len(got) == 3
    n_windows = (val.numel() - 1) // 64
    for i, (x, y) in enumerate(got):
        for j in range(2):
            k = (i * 2 + j) % n_windows  # consecutive windows, wrapping on a short split
            assert torch.equal(x[j], val[k * 64:(k + 1) * 64])
            assert torch.equal(y[j], val[k * 64 + 1:(k + 1) * 64 + 1])
    again = list(b.eval_batches(3))
    assert all(torch.equal(a[0], c[0]) for a, c in zip(got, again))


def test_bad_inputs(tmp_path):
    info = tiny_dataset()
    with pytest.raises(DataError, match="seq_len=0"):
        TokenBatcher(info.train_path, 0, 2)
    with pytest.raises(DataError, match="fewer than seq_len"):
        TokenBatcher(info.train_path, 10**7, 2)
    with pytest.raises(DataError, match="does not exist"):
        TokenBatcher(tmp_path / "train.bin", 8, 2)
    lone = tmp_path / "lone.bin"
    np.arange(100, dtype=np.uint16).tofile(lone)
    b = TokenBatcher(lone, 8, 2, dtype="uint16")
    assert b.batch(0)[0].shape == (2, 8)
    with pytest.raises(DataError, match="no validation split"):
        next(b.eval_batches(1))


def test_megatron_prefix_as_source(tmp_path):
    from linear_moe.data import write_indexed_dataset
    rng = np.random.default_rng()
    docs = [rng.integers(0, 500, size=int(rng.integers(1, 60))) for _ in range(30)]
    write_indexed_dataset(tmp_path / "tr", docs, np.uint16)
    write_indexed_dataset(tmp_path / "tr_val", docs[:5], np.int32)
    b = TokenBatcher(tmp_path / "tr.bin", 12, 4, seed=1)  # finds tr_val, as prepare_data names it
    assert b.val_path == tmp_path / "tr_val"
    stream = np.concatenate(docs)
    x, y = b.batch(0)
    assert all(_contains_window(stream, torch.cat([r, l[-1:]])) for r, l in zip(x, y))
    vx, vy = next(b.eval_batches(1))
    assert torch.equal(vx[0], torch.from_numpy(np.concatenate(docs[:5])[:12].astype(np.int64)))
