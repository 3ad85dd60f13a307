"""Reading and writing safetensors checkpoints, single-file or sharded with an index, and moving a
directory into place atomically. Nothing here unpickles: ``.bin`` weights are read with
``torch.load(weights_only=True)``."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

INDEX_NAME = "model.safetensors.index.json"


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory: ``model.safetensors``, shards listed by
    ``model.safetensors.index.json``, any ``*.safetensors``, or (last resort) ``pytorch_model*.bin``."""
    d = Path(directory)
    index = d / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{str(index)!r} is not a valid safetensors index (needs a 'weight_map'): {e}") from None
        files = sorted({d / name for name in weight_map.values()})
    elif (d / "model.safetensors").is_file():  # not other *.safetensors beside it (adapters, optimizer shards)
        files = [d / "model.safetensors"]
    else:
        files = sorted(d.glob("*.safetensors"))
    if files:
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            if not f.is_file():
                raise ValueError(f"weight shard {str(f)!r} named by the index does not exist")
            try:
                tensors.update(load_file(f))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{str(f)!r} is not a readable safetensors file: {e}") from None
        return tensors
    bins = sorted(d.glob("pytorch_model*.bin"))
    if bins:
        tensors = {}
        for f in bins:
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
        return tensors
    raise ValueError(f"{str(d)!r} holds no weights: expected model.safetensors, {INDEX_NAME} or *.safetensors")


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def write_sharded(tensors: dict[str, torch.Tensor], directory: Path, max_shard_size: int | str = "2GB") -> list[str]:
    """Write ``tensors`` as ``model.safetensors``, or, past ``max_shard_size`` bytes, as
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``. Returns the file names."""
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata=meta)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata=meta)
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names + [INDEX_NAME]


@contextmanager
def atomic_directory(output_dir: str | Path, overwrite: bool = False):
    """Yield a temporary directory beside ``output_dir``; on success it is renamed to ``output_dir``,
    on any error it is removed, so a failed conversion writes nothing."""
    out = Path(output_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ValueError(f"output directory {str(out)!r} already exists and is not empty; choose a new path "
                         "(or pass overwrite=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
