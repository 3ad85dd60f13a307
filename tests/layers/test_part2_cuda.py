"""Part-2 mixers on CUDA (whatever backend "auto" picks there) held to the CPU torch path, packed
documents and decoding included; bf16 forward/backward stays close to fp32. Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

from layer_testing import check_cuda_bf16_forward_backward, check_cuda_matches_cpu_and_decodes
from linear_moe.layers import MixerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NAMES = ["gsa", "based", "rebased", "rwkv6", "hgrn2", "mom_gla", "mom_gated_deltanet"]
# ReBased's normaliser Σ (q̃·k̃)² is ill-conditioned where it nears 0; bf16 projections then move a few
# outputs by several percent, so its bf16 check is loose. MoM routes each token to its top memories: in bf16 a
# near-tie flips for a few tokens, whose outputs then move by O(1). Measured on the H100 (2026-11-25, s10) over
# three seeds: bf16 vs fp32 0.7-4.2e-2 for MoM-GLA and MoM-GDN, the same on CPU's torch path (4.24e-2 vs
# 4.25e-2 at one seed) and with the torch backend on CUDA, while fp32 CUDA matched CPU to 4e-7: the routing,
# not a kernel. 5e-2 failed once (MoM-GDN); the exact check is test_cuda_matches_cpu_and_decodes.
BF16_TOL = {"rebased": 0.5, "mom_gla": 0.1, "mom_gated_deltanet": 0.1}


def config() -> MixerConfig:
    # 16 slots: GSA then trains through fla's chunk_gsa (its backward needs more than 8; 8 take the torch form)
    return MixerConfig(num_heads=2, num_slots=16, shared_memory=True)


@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu_and_decodes(name):
    check_cuda_matches_cpu_and_decodes(name, config(), [0, 40, 41, 150])


@pytest.mark.parametrize("name", NAMES)
def test_cuda_bf16_forward_backward(name):
    torch.manual_seed(0)
    check_cuda_bf16_forward_backward(name, config(), BF16_TOL.get(name, 5e-2))
