"""Session-wide test setup.

Without a GPU, Triton kernels (ours: the dqkwg fix, the MoE SwiGLU / gather-sum kernels) are tested through
Triton's interpreter. Triton reads ``TRITON_INTERPRET`` once, when it is first imported, and many modules import
it indirectly (``linear_moe.parallel`` → torch.distributed → ...), so it is set here, before any test module is
collected, instead of in the test files that need it (which made them depend on collection order).
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # shared helpers such as host_sync.py

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
