"""The sequence-parallel handler's check that a layer got this rank's local cu_seqlens reads it on the host (a device
sync on a GPU) once per tensor, not in every layer, and still refuses a wrong one."""
import pytest
import torch

from linear_moe.parallel.lasp2 import Lasp2Handler

from host_sync import no_host_sync  # noqa: E402  (tests/conftest.py puts tests/ on the path)


def _handler(rank: int, size: int) -> Lasp2Handler:
    h = Lasp2Handler.__new__(Lasp2Handler)  # the checks need no process group
    h.rank, h.size, h.layout, h.docs, h.enabled = rank, size, "contiguous", None, True
    return h


def test_local_cu_seqlens_is_compared_once_per_tensor(monkeypatch):
    h = _handler(1, 2)
    local = h.set_documents(torch.tensor([0, 5, 12, 16]), 16)  # rank 1 holds tokens 8..15
    assert local.tolist() == [0, 4, 8]
    passed = local.clone()  # what the trainer hands the model (a device copy on a GPU)
    assert h._check("gla", passed) is h.docs
    with no_host_sync(monkeypatch):
        for op in ("gla", "delta_rule", "short_conv"):
            assert h._check(op, passed) is h.docs
    with pytest.raises(ValueError, match=r"cu_seqlens \[0, 3, 8\] is not this rank's local view \[0, 4, 8\]"):
        h._check("gla", torch.tensor([0, 3, 8]))
    passed[1] = 3  # changed in place: compared again
    with pytest.raises(ValueError, match="is not this rank's local view"):
        h._check("gla", passed)
    h.set_documents(torch.tensor([0, 9, 16]), 16)  # the next batch: its own documents, checked afresh
    with pytest.raises(ValueError, match=r"cu_seqlens \[0, 4, 8\] is not this rank's local view \[0, 1, 8\]"):
        h._check("gla", local)
