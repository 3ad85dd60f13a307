"""ops_bench --resume: a kernel table that outlasts one device call keeps the earlier call's measured entries
(the timing and check loops skip them) and runs again what failed or did not run; another setup is refused."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ops_bench  # noqa: E402

SETUP = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0", "fla": "0.6.0"}


def _result():
    return {**SETUP, "check": {}, "time_ms": {}, "targets": {}}


def test_resume_keeps_measured_entries_only(tmp_path):
    earlier = {**SETUP, "date": "2026-11-24 23:16 UTC", "git_commit": "abc", "seed": 1,
               "check": {"gla/ours/bfloat16": {"ok": True, "max_rel": 0.003},
                         "gla/fla-stock/bfloat16": {"ok": False, "error": "RuntimeError: #640"},
                         "rwkv6/ours/bfloat16": {"ok": False, "error": "not run: out of time"}},
               "time_ms": {"2048": {"B": 16, "T": 2048, "sdpa": 2.2, "gla/ours": 7.1, "rwkv6/ours": "not run: out of time",
                                    "gla/fla-stock": "RuntimeError: #640"}}}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    result = _result()
    ops_bench.resume_into(result, str(tmp_path / "earlier.json"))
    assert result["check"] == {"gla/ours/bfloat16": {"ok": True, "max_rel": 0.003}}
    assert result["time_ms"]["2048"] == {"B": 16, "T": 2048, "sdpa": 2.2, "gla/ours": 7.1}
    assert result["resumed"] == [{"date": "2026-11-24 23:16 UTC", "git_commit": "abc", "seed": 1}]


def test_resume_refuses_another_setup(tmp_path):
    (tmp_path / "earlier.json").write_text(json.dumps({**SETUP, "triton": "3.7.1", "check": {}, "time_ms": {}}))
    with pytest.raises(SystemExit, match="triton='3.7.1'"):
        ops_bench.resume_into(_result(), str(tmp_path / "earlier.json"))
