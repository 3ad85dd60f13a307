"""A CPU check that code makes no host-device sync: on a GPU each of these would stall the host until the
device catches up (``torch.cuda.set_sync_debug_mode`` checks the same on a GPU).

``no_host_sync(monkeypatch)`` raises on every aten op that must read device data on the host (``.item()`` /
``bool()`` go through ``_local_scalar_dense``; ``nonzero``, boolean indexing, one-argument ``where``,
``repeat_interleave`` without ``output_size``, ``unique``, ``bincount``, ...) and patches the Tensor methods
that copy to the host (``tolist``, ``numpy``, ``cpu``, ``item``, ``bool()``, ``int()``, ``__index__``) to raise.
It also refuses tensors made from host data (``torch.tensor(3, device=...)``, ``as_tensor``: ``lift_fresh``):
on a GPU that is a host-to-device copy, which a CUDA graph cannot capture (``torch.full`` makes the same
tensor on the device).
"""
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.nonzero_numpy, aten.argwhere, aten.masked_select,
           aten.is_nonzero, aten.equal, aten.allclose, aten.unique_consecutive, aten._unique, aten._unique2,
           aten.unique_dim, aten.bincount}
HOST_METHODS = ("tolist", "numpy", "cpu", "item", "__bool__", "__int__", "__index__")


class NoHostSyncMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNCING or (packet is aten.where and len(args) + len(kwargs) == 1):
            raise AssertionError(f"host sync: {func}")
        if packet is aten.lift_fresh:
            raise AssertionError("host sync: a tensor made from host data (a host-to-device copy on a GPU)")
        if packet is aten.repeat_interleave and isinstance(args[-1] if len(args) > 1 else args[0], torch.Tensor) \
                and kwargs.get("output_size") is None:
            raise AssertionError("host sync: repeat_interleave without output_size")
        if packet in (aten.index, aten.index_put, aten.index_put_) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            raise AssertionError(f"host sync: boolean indexing ({func})")
        return func(*args, **kwargs)


def _refuse(name):
    def method(*args, **kwargs):
        raise AssertionError(f"host sync: Tensor.{name}")
    return method


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    with monkeypatch.context() as m:
        for name in HOST_METHODS:
            m.setattr(torch.Tensor, name, _refuse(name))
        with NoHostSyncMode():
            yield
