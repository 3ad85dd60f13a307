"""Part-1 linear mixers on CUDA (whatever backend "auto" picks there, fla when installed) held to the CPU
torch path; bf16 forward/backward stays close to fp32. Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

from layer_testing import check_cuda_bf16_forward_backward, check_cuda_matches_cpu_and_decodes
from linear_moe.layers import MixerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = {
    "linear_attention": {}, "lasp2": {}, "retention": {}, "lightning_attention": {}, "gla": {},
    "deltanet": {}, "gated_deltanet": {}, "mamba2": dict(state_size=16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_matches_cpu_and_decodes(name):
    check_cuda_matches_cpu_and_decodes(name, MixerConfig(num_heads=2, **CASES[name]), [0, 40, 150])


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_bf16_forward_backward(name):
    check_cuda_bf16_forward_backward(name, MixerConfig(num_heads=2, **CASES[name]))
