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
    assert [(r["kind"], r["context"], r["mode"]) for r in rows] == [
        ("gdn", 8, "eager"), ("gdn", 24, "eager"), ("attention", 8, "eager"), ("attention", 24, "eager")]
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


def test_both_modes_give_a_row_each_and_a_summary_each(tmp_path, capsys):
    """``--cuda-graph --no-graph``: eager and fixed-buffer (graph) rows for both kinds from one prefill; on the
    CPU the graph mode runs the static step without a graph and says so."""
    result = decode_bench.main(["--device", "cpu", "--tiny", "--contexts", "8,24", "--new-tokens", "2", "--warmup", "1",
                                "--cuda-graph", "--no-graph", "--dtype", "fp32", "--out", str(tmp_path)])
    rows = result["rows"]
    assert [(r["kind"], r["context"], r["mode"]) for r in rows] == [
        (k, c, m) for k in ("gdn", "attention") for c in (8, 24) for m in ("eager", "graph")]
    for r in rows:
        assert "error" not in r, r
        if r["mode"] == "graph":
            assert r["cuda_graph"] is False and r["graph_matches_eager"] is True
    modes = result["summary"]["modes"]
    assert set(modes) == {"eager", "graph"} and result["summary"]["kinds"] == modes["graph"]
    lat = {(r["kind"], r["context"], r["mode"]): r["latency_ms"] for r in rows}
    for mode in ("eager", "graph"):
        assert modes[mode]["gdn"]["speedup_vs_attention"] == pytest.approx(lat[("attention", 24, mode)] / lat[("gdn", 24, mode)])
    out = capsys.readouterr().out
    assert "[graph] gdn" in out and "[eager] gdn" in out and "static" in out


@pytest.mark.parametrize("kind, kernel", [("gdn", "auto"), ("attention", "auto"), ("attention", "sdpa")])
def test_decode_loops_equal_greedy_generate(kind, kernel):
    """Prefill (row by row, in chunks) + the benchmark's decode loops produce generate's tokens (fp32)."""
    args = decode_bench.parse_args(["--device", "cpu", "--tiny", "--dtype", "fp32", "--attention-decode", kernel])
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
        # the fixed-buffer step a CUDA graph captures, run eagerly (attention: the preallocated cache)
        static = decode_bench.StaticDecode(model, token, states, max_steps=5)
        got = torch.stack([static.step().clone() for _ in range(5)], 1)
        assert torch.equal(got, want[:, 1:])


def test_static_attention_step_equals_the_full_forward_through_cache_growth():
    """Teacher-forced one-token steps in the benchmark's fixed-buffer form (what the graph replays) give
    the full forward's logits (fp32), across a capacity regrowth between two static runs."""
    from linear_moe.layers.attention import CACHE_ROUND

    args = decode_bench.parse_args(["--device", "cpu", "--tiny", "--dtype", "fp32"])
    model = decode_bench.build_model("attention", args, torch.device("cpu"))
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    T, prompt = CACHE_ROUND + 9, 7
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=g)
    with torch.no_grad():
        full = model(ids).logits
        _, states = decode_bench.prefill(model, ids[:, :prompt], 0)
        logits, capacities = [], []
        # the first run fits the prefill's capacity (its steps + the 3 capture warm-ups + 1), the second regrows it
        for lo, hi in ((prompt, CACHE_ROUND - 4), (CACHE_ROUND - 4, T)):
            static = decode_bench.StaticDecode(model, ids[:, lo], states, max_steps=hi - lo)
            capacities.append(capacity := static.states[0]["k"].shape[2])
            for t in range(lo, hi):
                static.token[:, 0] = ids[:, t]  # teacher forcing: the next input is the true token
                out = model(static.token, states=static.states, return_states=True)
                decode_bench._copy_into(static.states, out.states)
                logits.append(out.logits[:, -1])
            assert static.states[0]["k"].shape[2] == capacity and static.states[0]["used"] == hi
            states = static.states
    got = torch.stack(logits, 1)
    want = full[:, prompt:T]
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert capacities == [CACHE_ROUND, 2 * CACHE_ROUND]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_matches_eager_on_the_gpu(tmp_path):
    result = decode_bench.main(["--tiny", "--contexts", "64", "--cuda-graph", "--new-tokens", "8", "--out", str(tmp_path)])
    assert [r["kind"] for r in result["rows"]] == ["gdn", "attention"]
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["cuda_graph"] and row["graph_matches_eager"]


def test_bad_arguments_are_refused():
    for bad in (["--kinds", "gdn,mamba"], ["--batch", "0"], ["--contexts", "0"]):
        with pytest.raises(SystemExit):
            decode_bench.parse_args(["--device", "cpu", "--tiny", *bad])
