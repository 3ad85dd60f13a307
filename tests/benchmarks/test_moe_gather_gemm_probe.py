"""benchmarks/moe_gather_gemm_probe.py off the GPU: the dry run through Triton's interpreter (set by conftest) writes
its results file with both GEMMs checked against the float64 loops (the kernels' own tests: tests/moe/test_moe_kernels.py)."""
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import moe_gather_gemm_probe as probe  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(DEVICE != "cpu", reason="the dry run is the CPU interpreter's")
def test_dry_run_writes_its_result(tmp_path):
    result = probe.main(["--device", "cpu", "--tokens", "32", "--top-k", "2", "--experts", "5", "--hidden", "24",
                         "--out-width", "16", "--iters", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "moe_gather_gemm_probe.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["shape"]["rows"] == 64 and set(saved["result"]) == {"fwd", "wgrad"}
    assert all(row["rel_err_vs_float64"] < 1e-5 for row in saved["result"].values())
    assert saved["environment"]["source_digest"]
