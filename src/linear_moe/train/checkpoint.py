"""Checkpoints that are never half-written: each is built in a temporary directory and renamed into
place when complete; the newest ``keep_last`` are kept.

Two formats, one layout (``<run>/checkpoints/step_00000200/`` with ``config.toml``, ``state.json`` and
``tokenizer.json`` beside the tensors):

- one process: ``model.safetensors`` + ``optimizer.pt`` (read back with ``weights_only=True``);
- several processes (sharded models, FSDP / TP / EP / PP): ``dcp/``, a torch.distributed.checkpoint
  directory written by every rank in parallel, readable under any other layout, one process included.
  The optimizer state is *flattened* (one entry per parameter and hyper-parameter, ``optim.state.<fqn>.<key>``,
  ``optim.param_groups.<fqn>.<key>``): DCP keeps one copy of a non-tensor object for all ranks, so the
  nested ``param_groups`` list, which differs between pipeline ranks, would keep only one rank's.
  Checkpoints written before that (nested: ``optim.param_groups.<index>.params``) still load.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A missing, incomplete or corrupt checkpoint; the message names the path."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def model_state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with shared (tied) ones stored once, contiguous, on the CPU."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    trainer_state: dict[str, Any], config_toml: str, keep_last: int = 2,
                    extra_files: dict[str, Path] | None = None) -> Path:
    """Write ``<run>/checkpoints/step_<step>`` atomically and delete all but the newest ``keep_last``.
    ``extra_files`` (name → source path, e.g. the tokenizer) are copied in, so a checkpoint stands alone.
    Under torch.distributed with several ranks every rank must call this (a collective)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if _is_main():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a run killed while saving
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    try:
        if _distributed():
            model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [], options=_FLAT)
            optim_sd = optim_sd if optimizer is not None else None
            payload = {"model": model_sd} | ({"optim": optim_sd} if optim_sd is not None else {})
            dcp.save(payload, checkpoint_id=str(tmp / "dcp"))
        else:
            save_file(model_state_for_saving(model), tmp / "model.safetensors")
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        _barrier()
        if _is_main():
            (tmp / "config.toml").write_text(config_toml)
            for name, source in (extra_files or {}).items():
                shutil.copyfile(source, tmp / name)
            state = dict(trainer_state, step=step, rng={"torch": torch.get_rng_state().tolist()})
            (tmp / "state.json").write_text(json.dumps(state))  # written last: marks the checkpoint complete
            _fsync_files(tmp)
            if final.exists():  # re-saving the same step (e.g. after a resume): swap in the new one
                old = root / f".old-step_{step:08d}"
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
            for stale in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(stale)
    except BaseException:
        if _is_main() and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory (→ its newest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    if (p / "model.safetensors").is_file() or (p / "dcp").is_dir():
        return p
    found = list_checkpoints(p)
    if not found:
        raise CheckpointError(f"{str(p)!r} holds no complete checkpoint (expected model.safetensors or dcp/, "
                              "or a run directory with checkpoints/step_*)")
    return found[-1]


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load weights (and optimizer state) into ``model``; return the trainer state saved with them.
    Either format loads into any layout: a sharded (DCP) checkpoint into one process and back."""
    ckpt = resolve_checkpoint(path)
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(ckpt / 'state.json')!r} is missing, corrupt or unreadable: {e}") from None
    if (ckpt / "dcp").is_dir():
        _load_dcp(ckpt, model, optimizer)
    else:
        _load_single(ckpt, model, optimizer, map_location)
    if "rng" in state:
        torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
    return state


def _load_single(ckpt: Path, model: nn.Module, optimizer, map_location) -> None:
    try:
        tensors = load_file(ckpt / "model.safetensors", device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{str(ckpt / 'model.safetensors')!r} is corrupt or unreadable: {e}") from None
    optim_state = None
    if optimizer is not None:
        opt_path = ckpt / "optimizer.pt"
        if not opt_path.is_file():
            raise CheckpointError(f"{str(opt_path)!r} is missing; cannot resume the optimizer")
        try:
            optim_state = torch.load(opt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors vary; the message names the file either way
            raise CheckpointError(f"{str(opt_path)!r} is corrupt or unreadable: {e}") from None
    if _distributed() or any(hasattr(p, "device_mesh") for p in model.parameters()):
        _load_single_into_sharded(ckpt, model, optimizer, tensors, optim_state)
        return
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [n for n in missing if not _is_tied(model, n)]
    if missing or unexpected:
        raise CheckpointError(f"{str(ckpt)!r} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if optimizer is not None:
        try:
            optimizer.load_state_dict(optim_state)
        except Exception as e:
            raise CheckpointError(f"{str(ckpt / 'optimizer.pt')!r} does not match the optimizer: {e}") from None


def _load_single_into_sharded(ckpt: Path, model: nn.Module, optimizer, tensors: dict, optim_state: dict | None) -> None:
    """A one-process checkpoint resumed under FSDP / TP / EP: every rank reads the full tensors and keeps its
    shards. The optimizer state is saved by parameter index; the optimizer built the same way on the sharded
    model lists the same parameters in the same order, which gives each index its name."""
    names = {id(p): n for n, p in model.named_parameters()}
    for name in model.state_dict():
        if name not in tensors and _is_tied(model, name):  # a tied LM head is stored once, as the embedding
            tensors[name] = next(tensors[n] for n in tensors if _is_tied(model, n) and n != name)
    optim_sd = {}
    if optimizer is not None:
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        saved_groups = optim_state["param_groups"]
        if len(order) != sum(len(g["params"]) for g in saved_groups) or len(saved_groups) != len(optimizer.param_groups):
            raise CheckpointError(f"{str(ckpt / 'optimizer.pt')!r} holds the state of a different set of parameters")
        optim_sd = {"state": {order[i]: st for i, st in optim_state["state"].items()},
                    "param_groups": [dict(saved, params=[names[id(p)] for p in group["params"]])
                                     for saved, group in zip(saved_groups, optimizer.param_groups)]}
    try:
        set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=tensors,
                       optim_state_dict=optim_sd, options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{str(ckpt)!r} cannot be loaded into this sharded model: {str(e).splitlines()[0][:300]}") from None


_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _load_dcp(ckpt: Path, model: nn.Module, optimizer) -> None:
    path = ckpt / "dcp"
    try:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:
        raise CheckpointError(f"{str(path)!r} has no readable DCP metadata: {str(e).splitlines()[0][:300]}") from None
    # Older checkpoints kept the optimizer nested: DCP stored its param_groups list by index, each group's
    # ``params`` (a list of names) written once for all ranks.
    nested = any(re.fullmatch(r"optim\.param_groups\.\d+\.params", k) for k in saved)
    options = StateDictOptions() if nested else _FLAT
    if optimizer is not None and not any(k.startswith("optim.") for k in saved):
        raise CheckpointError(f"{str(path)!r} holds no optimizer state; cannot resume the optimizer")
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [], options=options)
    payload = {"model": model_sd} | ({"optim": optim_sd} if optimizer is not None else {})
    # an old pipeline run's checkpoint kept one pp rank's groups: the other ranks' parameters are not in them
    mine = {n for g in optim_sd["param_groups"] for n in g["params"]} if nested and optimizer is not None else set()
    try:
        dcp.load(payload, checkpoint_id=str(path))
        missing = sorted(mine - {n for g in payload["optim"]["param_groups"] for n in g["params"]}) if mine else []
        if missing:
            raise ValueError(f"its param_groups lack this optimizer's parameters {missing[:3]}")
        set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=payload["model"],
                       optim_state_dict=payload.get("optim", {}), options=options)
    except (Exception, CheckpointException) as e:  # several types for missing / mismatched entries (one a BaseException)
        hint = ("; it holds the older, nested optimizer state, which keeps the param_groups of one rank only "
                "(a pipeline-parallel run's ranks differ): load the weights alone (no optimizer) and start the "
                "optimizer afresh") if nested else ""
        raise CheckpointError(f"{str(path)!r} cannot be loaded into this model: {str(e).splitlines()[0][:300]}{hint}") from None


def _is_tied(model: nn.Module, name: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    if name not in params:
        return False
    ptr = params[name].data_ptr()
    return any(other != name and p.data_ptr() == ptr for other, p in params.items())


def _fsync_files(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
