"""On a GPU: imported models reproduce the HF source there too (SDPA kernels, grouped-GEMM experts), and
evaluation scores match the CPU ones. Skipped without CUDA."""
from __future__ import annotations

import copy

import pytest
import torch

from linear_moe.interop.hf_import import build_from_hf
from linear_moe.interop.perplexity import evaluate_perplexity

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "llama"])
def test_import_matches_source_on_gpu(hf_checkpoints, family):
    path, ref = hf_checkpoints[family]
    model, _, _ = build_from_hf(path)
    ref_gpu, model = copy.deepcopy(ref).to("cuda"), model.to("cuda").eval()  # the fixture's model stays intact
    ids = torch.randint(0, model.config.vocab_size, (3, 40), device="cuda")
    with torch.no_grad():
        want, got = ref_gpu(ids).logits.float(), model(ids).logits.float()
        assert float((want - got).norm() / want.norm()) < 1e-3
        ref_gpu.to(torch.bfloat16), model.to(torch.bfloat16)
        want, got = ref_gpu(ids).logits.float(), model(ids).logits.float()
        # bf16: both round differently; the logits still agree to about 1%
        assert float((want - got).norm() / want.norm()) < 3e-2


def test_perplexity_gpu_matches_cpu(tiny_model_dir, tmp_path):
    d, _ = tiny_model_dir
    f = tmp_path / "text.txt"
    f.write_text("a week has seven days and a year has twelve months. " * 8)
    cpu = evaluate_perplexity(d, f, chunk_len=16, device="cpu")
    gpu = evaluate_perplexity(d, f, chunk_len=16, device="cuda")
    assert gpu["tokens"] == cpu["tokens"] and gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)
