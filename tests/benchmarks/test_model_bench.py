"""The model benchmark's kind names: parsed, and refused with the allowed list when unknown."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import model_bench  # noqa: E402


@pytest.mark.parametrize("kind, want", [
    ("gdn", ("gdn", False, True)), ("gla@graph", ("gla", True, True)),
    ("hybrid@graph+torch_ce", ("hybrid", True, False)), ("attention+torch_ce", ("attention", False, False)),
    ("peer_fla_gdn", ("peer_fla_gdn", False, False)),
])
def test_kinds_parse(kind, want):
    assert model_bench.parse_kind(kind) == want


@pytest.mark.parametrize("kind", ["gdm", "gdn@grpah", "gdn@graph+ce", "gdn+ce_kernel", "peer_sdpa@graph", "peer_sdpa+torch_ce"])
def test_unknown_kinds_are_refused_with_the_allowed_list(kind):
    with pytest.raises(ValueError, match=r"allowed gdn, gla, hybrid, attention \(each optionally @graph, then "
                                         r"optionally \+torch_ce\) and peer_sdpa"):
        model_bench.parse_kind(kind)


def test_issue_targets_from_the_rows_of_one_run():
    """The fastest variant of each kind counts; the 3x entry carries the FLOP ratio (the speed ratio at equal MFU);
    failed rows and targets without rows are left out."""
    rows = [
        {"kind": "gdn", "T": 2048, "tok_s": 30e3, "mfu": 0.10, "flops_per_token": 2.9e9},
        {"kind": "gdn@graph", "T": 2048, "tok_s": 70e3, "mfu": 0.21, "flops_per_token": 2.9e9},
        {"kind": "gdn@graph", "T": 8192, "tok_s": 60e3, "mfu": 0.2, "flops_per_token": 2.9e9},
        {"kind": "gdn@graph", "T": 32768, "tok_s": 66e3, "mfu": 0.2, "flops_per_token": 2.92e9},
        {"kind": "attention@graph", "T": 32768, "tok_s": 44e3, "mfu": 0.25, "flops_per_token": 5.24e9},
        {"kind": "attention", "T": 32768, "error": "OOM"},
        {"kind": "peer_fla_gdn", "T": 8192, "tok_s": 40e3},
        {"kind": "peer_sdpa", "T": 8192, "error": "OOM"},
    ]
    t = model_bench.issue_targets(rows)
    assert t["gdn MFU >= 30% at 2K"] == {"measured": 0.21, "kind": "gdn@graph", "met": False}
    assert t["gdn tok/s at 32K >= 0.9x at 2K"] == {"measured": pytest.approx(66 / 70, abs=1e-3), "met": True}
    three = t["gdn at 32K >= 3x attention at 32K"]
    assert three["measured"] == 1.5 and three["met"] is False
    assert three["flop_ratio"] == pytest.approx(5.24 / 2.92, abs=1e-3) and three["mfu"] == [0.2, 0.25]
    assert t["gdn >= 1.5x peer_fla_gdn at 8K"] == {"measured": 1.5, "kind": "gdn@graph", "met": True}
    assert not any("gla" in name or "peer_sdpa" in name for name in t)


def test_time_steps_reports_the_hosts_share(monkeypatch):
    """Seconds per step, the last loss, and the host's seconds to issue a step (with nothing to wait for on the
    CPU, the two times agree)."""
    import time

    import torch
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []
    dt, loss, host = model_bench.time_steps(None, lambda: calls.append(1) or time.sleep(0.002) or torch.tensor(2.5), 2, 3)
    assert len(calls) == 5 and loss == 2.5 and 0 < host <= dt and host == pytest.approx(dt, rel=0.5)
