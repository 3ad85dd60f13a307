"""Interoperability and evaluation: Hugging Face import / export and lm-evaluation-harness.

Sits beside ``train``, above ``model``. Heavy optional dependencies (``transformers`` for tests only,
``lm_eval`` for the harness adapter) are imported lazily by the modules that need them.
"""
from __future__ import annotations

from .hf import convert_to_hf, from_pretrained
from .hf_import import convert_from_hf

__all__ = ["convert_from_hf", "convert_to_hf", "from_pretrained"]
