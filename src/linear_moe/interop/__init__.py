"""Interoperability and evaluation: Hugging Face import / export and lm-evaluation-harness.

Sits beside ``train``, above ``model``. Heavy optional dependencies (``transformers`` for tests only,
``lm_eval`` for the harness adapter) are imported lazily by the modules that need them.
"""
from __future__ import annotations

from .hf import convert_to_hf, from_pretrained, save_pretrained
from .hf_import import build_from_hf, convert_from_hf
from .perplexity import evaluate_perplexity

# The lm-eval adapter lives in ``.harness`` (``LinearMoELM``, ``run_lm_eval``); it imports ``lm_eval``,
# so it is not imported here.
__all__ = ["build_from_hf", "convert_from_hf", "convert_to_hf", "evaluate_perplexity", "from_pretrained", "save_pretrained"]
