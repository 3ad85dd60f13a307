"""benchmarks/dqkwg_probe.py off the GPU: each configuration runs in its own process (here through Triton's
interpreter) against the float64 reference, and a child that dies becomes a row naming why, not a lost run."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import dqkwg_probe  # noqa: E402


def test_probe_rows_on_the_interpreter(tmp_path):
    result = dqkwg_probe.main(["--device", "cpu", "--ks", "16", "--dtypes", "float32", "--configs", "4:2,8:3",
                               "--heads", "1:1,1:2", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "dqkwg_probe.json").read_text())["rows"]
    assert rows == result["rows"] and [(r["HV"], r["num_warps"], r["num_stages"]) for r in rows] == [
        (1, 4, 2), (1, 8, 3), (2, 4, 2), (2, 8, 3)]
    for row in rows:
        assert row["status"] == "ok", row
        assert set(row["rel_err"]) == {"dq", "dk", "dg"} and 0 < max(row["rel_err"].values()) < 1e-5


def test_a_dying_child_is_a_row_with_its_message():
    row = dqkwg_probe.run_row(0, "float32", 4, 2, "cpu", timeout_s=120)  # K = 0: the child raises
    assert row["status"] == "error" and row["returncode"] != 0 and row["message"]


def test_bad_dtype_is_refused():
    with pytest.raises(SystemExit, match="'float8' is not one of bfloat16, float32"):
        dqkwg_probe.main(["--device", "cpu", "--dtypes", "float8"])
