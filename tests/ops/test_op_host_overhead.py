"""What an op call costs the host, where a packed GPU training step pays it in every layer: the backend rule reads
package versions once per process, and a packed batch's cu_seqlens is read on the host (on a GPU a device sync) once
per tensor, not once per op call; the fla wrapper hands fla one int64 copy of it, so fla's own memoised chunk
indices (which also read it on the host) are built once too (that part: test_backends_fla.py)."""
from __future__ import annotations

from importlib import metadata

import pytest
import torch

import linear_moe.ops.backends as bk
from linear_moe import ops
from linear_moe.ops import _checks
from ops_testing import delta_inputs, generator

from host_sync import no_host_sync  # noqa: E402  (tests/conftest.py puts tests/ on the path)


def test_package_versions_are_read_once(monkeypatch):
    calls = []
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: calls.append(name) or real(name))
    bk._package_version.cache_clear()
    try:
        for _ in range(50):
            bk.fla_version(), bk.triton_version()
            bk.resolve_backend("delta_rule", None, "cpu", torch.float32, decay="scalar")
        assert len(calls) == len(set(calls)) <= 3  # fla-core (maybe flash-linear-attention too), triton: once each
    finally:
        bk._package_version.cache_clear()


def _fake_fla_backend(monkeypatch):
    class Fake:  # answers without reading anything on the host
        @staticmethod
        def delta_rule(q, k, v, *args, **kwargs):
            return torch.zeros_like(v), None

        @staticmethod
        def short_conv(x, *args, **kwargs):
            return torch.zeros_like(x), None
    monkeypatch.setattr(bk, "resolve_backend", lambda *a, **kw: "fla")
    monkeypatch.setattr(bk, "get_backend", lambda name: Fake)


def test_cu_seqlens_is_read_on_the_host_once_per_tensor(monkeypatch):
    """Every layer of a packed step passes the same cu_seqlens: the first op call reads it, the later ones must not."""
    _fake_fla_backend(monkeypatch)
    args = delta_inputs(True, generator(), B=1, T=30, with_state=False)
    cu = torch.tensor([0, 7, 30], dtype=torch.int32)
    ops.delta_rule(**args, cu_seqlens=cu)  # reads cu on the host once
    with no_host_sync(monkeypatch):
        for _ in range(3):
            ops.delta_rule(**args, cu_seqlens=cu)
            ops.short_conv(args["v"].flatten(2), torch.ones(12, 4), cu_seqlens=cu)
            assert _checks.max_seqlen(cu, 30) == 23 and _checks.pick_mode("auto", cu, 30) == "chunk"


def test_a_new_or_changed_cu_seqlens_is_checked_again():
    args = delta_inputs(False, generator(), B=1, T=30, with_state=False)
    good = torch.tensor([0, 7, 30])
    ops.delta_rule(**args, cu_seqlens=good, backend="torch")
    assert _checks.check_cu_seqlens(good, 1, 30) == 2
    with pytest.raises(ValueError, match=r"never decrease and end at time=30, got \[0, 9, 29\]"):
        ops.delta_rule(**args, cu_seqlens=torch.tensor([0, 9, 29]), backend="torch")  # another tensor: read again
    good[1] = 31  # the same tensor changed in place (its version moves on): read again
    with pytest.raises(ValueError, match=r"got \[0, 31, 30\]"):
        ops.delta_rule(**args, cu_seqlens=good, backend="torch")
    again = torch.tensor([0, 3, 10, 30])
    assert _checks.check_cu_seqlens(again, 1, 30) == 3 and _checks.max_seqlen(again, 30) == 20
    with pytest.raises(ValueError, match="needs batch size 1, got batch=2"):
        _checks.check_cu_seqlens(again, 2, 30)  # the same tensor with another batch size is not a cache hit
