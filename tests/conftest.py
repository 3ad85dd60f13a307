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
else:
    # fp32 comparisons with the CPU hold Triton's fp32 dot products to IEEE, as the tests hold PyTorch's matmuls
    # (allow_tf32=False): Triton's default on NVIDIA is TF32 (~1e-3 relative), the size of those tests' tolerance
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
