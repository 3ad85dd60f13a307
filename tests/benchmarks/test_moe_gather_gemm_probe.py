"""benchmarks/moe_gather_gemm_probe.py's fused kernels off the GPU (Triton's interpreter, set by conftest): each
expert's rows gathered by index and multiplied by its own weights, and the weight gradient summed over each expert's
gathered rows, with an empty expert, a partial tile and a multi-tile expert, against float64 per-expert loops; and
the dry run's results file."""
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import moe_gather_gemm_probe as probe  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_gathered_rows_per_expert_match_the_loop():
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 37, 3])  # tiles of 16 in the interpreter: one partial, none, three, one
    n, N, C, out = int(counts.sum()), 20, 24, 40
    x = torch.randn(N, C, generator=g)
    token = torch.randint(0, N, (n,), generator=g)  # any source rows, repeats included
    w = torch.randn(len(counts), out, C, generator=g)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    got = probe.gathered_grouped_mm(*(t.to(DEVICE) for t in (x, token, offs, w)))
    want = probe.reference(x, token, offs, w)
    assert got.shape == (n, out)
    tol = 1e-5 if DEVICE == "cpu" else 5e-3  # the GPU's fp32 dots run in tf32
    assert ((got.double().cpu() - want).norm() / want.norm()).item() < tol
    per_expert = [x[token[s:e]] @ w[i].T for i, (s, e) in enumerate(zip([0, *offs[:-1].tolist()], offs.tolist()))]
    torch.testing.assert_close(got.cpu()[:5], per_expert[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got.cpu()[5:42], per_expert[2], rtol=tol, atol=tol)


def test_weight_gradient_gathers_the_reduction_rows():
    """dW[e] = g[rows of e]^T x[token[rows of e]]: an empty expert gets zeros, a multi-block expert sums its blocks."""
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([5, 0, 37, 3])
    n, N, C, out = int(counts.sum()), 20, 24, 40
    x, grad = torch.randn(N, C, generator=g), torch.randn(n, out, generator=g)
    token = torch.randint(0, N, (n,), generator=g)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    got = probe.gathered_grouped_wgrad(*(t.to(DEVICE) for t in (grad, x, token, offs))).cpu()
    want = probe.reference_wgrad(grad, x, token, offs)
    tol = 1e-5 if DEVICE == "cpu" else 5e-3
    assert got.shape == (4, out, C) and torch.equal(got[1], torch.zeros(out, C))
    assert ((got.double() - want).norm() / want.norm()).item() < tol
    torch.testing.assert_close(got[2], grad[5:42].T @ x[token[5:42]], rtol=tol, atol=tol)


@pytest.mark.skipif(DEVICE != "cpu", reason="the dry run is the CPU interpreter's")
def test_dry_run_writes_its_result(tmp_path):
    result = probe.main(["--device", "cpu", "--tokens", "32", "--top-k", "2", "--experts", "5", "--hidden", "24",
                         "--out-width", "16", "--iters", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "moe_gather_gemm_probe.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["shape"]["rows"] == 64 and set(saved["result"]) == {"fwd", "wgrad"}
    assert all(row["rel_err_vs_float64"] < 1e-5 for row in saved["result"].values())
    assert saved["environment"]["source_digest"]
