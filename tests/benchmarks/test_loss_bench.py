"""The loss benchmark's dry run on the CPU: every form runs and they agree (they compute one loss)."""
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import loss_bench  # noqa: E402


def test_dry_run_every_form_gives_the_same_loss(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LINEAR_MOE_CE_KERNEL", raising=False)
    rows = loss_bench.main(["--device", "cpu", "--tokens", "40", "--vocab", "300", "--hidden", "16", "--chunk", "16",
                            "--out", str(tmp_path)])
    assert list(rows) == ["fused+kernel", "fused+torch", "checkpointed", "full_logits"]
    losses = [r["loss"] for r in rows.values()]
    assert all(loss == pytest.approx(losses[-1], rel=1e-2) for loss in losses)  # bf16 head matmuls
    assert json.loads((tmp_path / "loss_bench.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert "full_logits" in capsys.readouterr().out
    assert "LINEAR_MOE_CE_KERNEL" not in os.environ  # each row's setting is undone after it
