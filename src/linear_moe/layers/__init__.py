"""Token mixers: one file per family, one registry (see ``registry.py``).

Importing this package imports every module in it, so each mixer registers itself; adding a mixer is
adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil

from .config import AttentionConfig, MixerConfig
from .registry import MIXERS, available_mixers, build_mixer, register_mixer

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["AttentionConfig", "MixerConfig", "MIXERS", "available_mixers", "build_mixer", "register_mixer"]
