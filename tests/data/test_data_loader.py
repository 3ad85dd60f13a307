import json

import numpy as np
import pytest
import torch

from linear_moe.data import DataError
from linear_moe.data.indexed import write_indexed_dataset
from linear_moe.data.loader import BlendedLoader, ShuffledWindows, parse_blend
from linear_moe.data.packing import PackedBatch
from linear_moe.data.testing import tiny_dataset


def _two_sources(tmp_path):
    rng = np.random.default_rng()
    a = [rng.integers(100, 200, size=int(rng.integers(5, 30))) for _ in range(20)]
    write_indexed_dataset(tmp_path / "a", a, np.uint16)
    b = rng.integers(1000, 1100, size=700)  # in-memory source; its ids tell where a row came from
    return tmp_path / "a", b


def test_one_epoch_visits_every_window_once():
    tokens = np.arange(1, 102)
    sw = ShuffledWindows(tokens, seq_len=10, seed=int(np.random.randint(1 << 30)))
    assert sw.n == 10
    firsts = sorted(int(sw.window(j)[0]) for j in range(10))
    assert firsts == list(range(1, 101, 10))
    assert all(sw.window(j).size == 11 for j in range(25))
    assert [int(sw.window(j)[0]) for j in range(10, 20)] != [int(sw.window(j)[0]) for j in range(10)]


def test_blend_follows_weights_exactly(tmp_path):
    a, b = _two_sources(tmp_path)
    loader = BlendedLoader([a, b], [1, 3], seq_len=8, batch_size=4, seed=int(np.random.randint(1 << 30)))
    from_b = 0
    for step in range(10):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])
        is_b = (x >= 1000).all(dim=1)
        assert torch.all(is_b | (x < 200).all(dim=1))  # a row never mixes sources
        from_b += int(is_b.sum())
        n = 4 * (step + 1)
        assert abs(from_b - 0.75 * n) <= 1  # exact at every prefix, not just on average
    assert loader.state_dict()["counts"] == [40 - from_b, from_b]


def test_resume_continues_with_next_unseen_batch(tmp_path):
    a, b = _two_sources(tmp_path)
    seed = int(np.random.randint(1 << 30))
    make = lambda: BlendedLoader([a, b], [0.4, 0.6], 8, 3, seed)
    run = make()
    for _ in range(7):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # survives a JSON round trip (checkpoint)
    expected = [run.next_batch() for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other = BlendedLoader([a, b], [0.4, 0.6], 8, 3, seed + 1)
    assert not torch.equal(other.next_batch()[0], make().next_batch()[0])


def test_ranks_split_global_batch_and_packing(tmp_path):
    info = tiny_dataset()
    whole = BlendedLoader([info.train_path], None, 16, 4, seed=3).next_batch()[0]
    parts = [BlendedLoader([info.train_path], None, 16, 2, seed=3, rank=r, world_size=2).next_batch()[0]
             for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)
    packed = BlendedLoader([info.train_path], None, 16, 4, seed=3, pack=True, eos_id=info.eos_id).next_batch()
    assert isinstance(packed, PackedBatch) and torch.equal(packed.input_ids, whole)
    assert packed.cu_seqlens[0] == 0 and packed.cu_seqlens[-1] == 64


def test_parse_blend_and_errors(tmp_path):
    assert parse_blend("data/x") == (["data/x"], [1.0])
    assert parse_blend("0.3 a 0.7 b") == (["a", "b"], [0.3, 0.7])
    with pytest.raises(DataError, match="weight prefix"):
        parse_blend("0.3 a 0.7")
    with pytest.raises(DataError, match="not a number"):
        parse_blend("a 0.3 b 0.7")
    a, b = _two_sources(tmp_path)
    with pytest.raises(DataError, match="2 weights for 1 sources"):
        BlendedLoader([a], [1, 2], 8, 2)
    with pytest.raises(DataError, match="fewer than seq_len"):
        BlendedLoader([a], None, 10**6, 2)
    with pytest.raises(DataError, match="does not exist"):
        BlendedLoader([tmp_path / "missing"], None, 8, 2)
    with pytest.raises(DataError, match="needs eos_id"):
        BlendedLoader([a], None, 8, 2, pack=True)
    loader = BlendedLoader([a, b], [1, 1], 8, 2, seed=1)
    with pytest.raises(DataError, match="seed="):
        loader.load_state_dict({**loader.state_dict(), "seed": 2})
    with pytest.raises(DataError, match="weights"):
        BlendedLoader([a, b], [1, 3], 8, 2, seed=1).load_state_dict(loader.state_dict())
