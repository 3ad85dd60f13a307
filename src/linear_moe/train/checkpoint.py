"""Checkpoints that are never half-written: each is built in a temporary directory and renamed into
place when complete. Weights in safetensors; optimizer state loaded with ``weights_only=True``.

Layout of a run directory::

    <run>/config.toml                      the job configuration
    <run>/checkpoints/step_00000200/       model.safetensors, optimizer.pt, state.json, config.toml
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A missing, incomplete or corrupt checkpoint; the message names the path."""


def model_state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with shared (tied) ones stored once, contiguous, on the CPU."""
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen[key] = name
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    trainer_state: dict[str, Any], config_toml: str, keep_last: int = 2,
                    extra_files: dict[str, Path] | None = None) -> Path:
    """Write ``<run>/checkpoints/step_<step>`` atomically and delete all but the newest ``keep_last``.
    ``extra_files`` (name → source path, e.g. the tokenizer) are copied in, so a checkpoint stands alone."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(model_state_for_saving(model), tmp / "model.safetensors")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "config.toml").write_text(config_toml)
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, tmp / name)
    state = dict(trainer_state, step=step, rng={"torch": torch.get_rng_state().tolist()})
    (tmp / "state.json").write_text(json.dumps(state))
    _fsync_files(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): swap in the new one atomically
        old = root / f".old-step_{step:08d}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_files(root)
    for stale in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(stale)
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
    if (p / "model.safetensors").is_file():
        return p
    found = list_checkpoints(p)
    if not found:
        raise CheckpointError(f"{str(p)!r} holds no complete checkpoint (expected model.safetensors, or a run directory with checkpoints/step_*)")
    return found[-1]


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load weights (and optimizer state) into ``model``; return the trainer state saved with them."""
    ckpt = resolve_checkpoint(path)
    try:
        tensors = load_file(ckpt / "model.safetensors", device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{str(ckpt / 'model.safetensors')!r} is corrupt or unreadable: {e}") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {n for n in missing if _is_tied(model, n)}
    missing = [n for n in missing if n not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{str(ckpt)!r} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(ckpt / 'state.json')!r} is corrupt or unreadable: {e}") from None
    if optimizer is not None:
        opt_path = ckpt / "optimizer.pt"
        if not opt_path.is_file():
            raise CheckpointError(f"{str(opt_path)!r} is missing; cannot resume the optimizer")
        try:
            optimizer.load_state_dict(torch.load(opt_path, map_location=map_location, weights_only=True))
        except Exception as e:  # pickle errors vary; the message names the file either way
            raise CheckpointError(f"{str(opt_path)!r} is corrupt or does not match the optimizer: {e}") from None
    if "rng" in state:
        torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
    return state


def _is_tied(model: nn.Module, name: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    if name not in params:
        return False
    ptr = params[name].data_ptr()
    return any(other != name and p.data_ptr() == ptr for other, p in params.items())


def _fsync_files(path: Path) -> None:
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
