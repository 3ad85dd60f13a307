"""linear-moe's own Triton kernels. Importing this package imports Triton.

For now: `chunk_bwd_dqkwg`, the backward step of the chunked gated kernels, a drop-in for
fla-core 0.6.0's version that is miscompiled on Hopper with Triton 3.4 - 3.7.0 (fla #640).
"""

from linear_moe.ops.backends.triton.dqkwg import chunk_bwd_dqkwg, chunk_indices_from_cu_seqlens

__all__ = ["chunk_bwd_dqkwg", "chunk_indices_from_cu_seqlens"]
