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


def _interpreter_loop_bounds_from_loaded_scalars() -> None:
    """Triton 3.6's interpreter holds a scalar as a one-element array and turns it into a loop bound with
    ``int(array)``, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted"): a kernel looping between
    offsets it loaded (benchmarks/moe_gather_gemm_probe.py's weight gradient) could not run on the CPU. Convert
    through the array's single element instead; the compiled kernels on the GPU are not touched."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


_interpreter_loop_bounds_from_loaded_scalars()
