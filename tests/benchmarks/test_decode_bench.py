"""The decode benchmark's dry run on the CPU, and its decode loops against ``generate``."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import decode_bench  # noqa: E402

from linear_moe.model.generation import generate  # noqa: E402


def test_tiny_dry_run_reports_latency_flatness_and_speedup(tmp_path, capsys):
    result = decode_bench.main(["--device", "cpu", "--tiny", "--contexts", "8,24", "--new-tokens", "3", "--warmup", "1",
                                "--out", str(tmp_path)])
    rows = result["rows"]
    assert [(r["kind"], r["context"]) for r in rows] == [("gdn", 8), ("gdn", 24), ("attention", 8), ("attention", 24)]
    for r in rows:
        assert "error" not in r, r
        assert r["steps"] == 3 and 0 < r["latency_ms"] <= r["latency_p90_ms"] + 1e-9
        assert r["tok_s"] == pytest.approx(1e3 / r["latency_mean_ms"])
    lat = {(r["kind"], r["context"]): r["latency_ms"] for r in rows}
    gdn = result["summary"]["kinds"]["gdn"]
    assert gdn["flatness"] == pytest.approx(lat[("gdn", 24)] / lat[("gdn", 8)])
    assert gdn["speedup_vs_attention"] == pytest.approx(lat[("attention", 24)] / lat[("gdn", 24)])
    assert gdn["flat_met"] == (abs(gdn["flatness"] - 1) <= 0.15)
    saved = json.loads((tmp_path / "decode_bench.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert "attention's decode speed at the longest context" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["gdn", "attention"])
def test_decode_loops_equal_greedy_generate(kind):
    """Prefill (row by row, in chunks) + the benchmark's decode loops produce generate's tokens (fp32)."""
    args = decode_bench.parse_args(["--device", "cpu", "--tiny", "--dtype", "fp32"])
    torch.manual_seed(5)
    model = decode_bench.build_model(kind, args, torch.device("cpu"))
    with torch.no_grad():  # a larger init so the tokens depend on the context (not only on the last token)
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    prompt = torch.randint(0, model.config.vocab_size, (2, 11))
    want = generate(model, prompt, 6)[:, 11:]
    with torch.no_grad():
        for chunk in (0, 4):
            logits, states = decode_bench.prefill(model, prompt, chunk if kind == "gdn" else 0)
            token = logits.argmax(-1)
            assert torch.equal(token, want[:, 0])
            eager, _ = decode_bench.decode_eager(model, token, states, 5)
            assert torch.equal(eager, want[:, 1:])
        if kind == "gdn":  # the fixed-buffer step a CUDA graph captures, run eagerly
            static = decode_bench.StaticDecode(model, token, states)
            got = torch.stack([static.step().clone() for _ in range(5)], 1)
            assert torch.equal(got, want[:, 1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_matches_eager_on_the_gpu(tmp_path):
    result = decode_bench.main(["--tiny", "--kinds", "gdn", "--contexts", "64", "--cuda-graph", "--new-tokens", "8",
                                "--out", str(tmp_path)])
    row = result["rows"][0]
    assert "error" not in row and "cuda_graph_error" not in row, row
    assert row["cuda_graph_matches_eager"]


def test_bad_arguments_are_refused():
    for bad in (["--kinds", "gdn,mamba"], ["--batch", "0"], ["--contexts", "0"]):
        with pytest.raises(SystemExit):
            decode_bench.parse_args(["--device", "cpu", "--tiny", *bad])
