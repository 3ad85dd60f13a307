"""Parameters stored as DTensors (so FSDP, gradient clipping and checkpoints see their global shape
and placement) but used as plain local shards by a module whose code calls plain-tensor ops.

`shard_parameters(module, names, mesh, dtensors)` registers the DTensors and wraps ``module.forward``
so that, during the call, ``module.<name>`` is the local shard (``to_local`` is differentiable: the
gradient lands on the shard). Used for per-head parameters under tensor parallelism and for the
routed experts under expert parallelism.
"""
from __future__ import annotations

import functools

from torch import nn
from torch.distributed.tensor import DTensor


def shard_parameters(module: nn.Module, names: list[str], mesh, dtensors: list[DTensor]) -> None:
    if not names:
        return
    for name, value in zip(names, dtensors):
        old = module._parameters[name]
        module.register_parameter(name, nn.Parameter(value, requires_grad=old.requires_grad))
    if getattr(module, "_local_shard_names", None) is not None:
        module._local_shard_names += list(names)
        return
    module._local_shard_names = list(names)
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        saved = {n: module._parameters[n] for n in module._local_shard_names}
        try:
            for n, p in saved.items():  # FSDP may have swapped in its unsharded parameter: read it now
                module._parameters[n] = p.to_local() if isinstance(p, DTensor) else p
            return inner(*args, **kwargs)
        finally:
            module._parameters.update(saved)

    module.forward = forward
