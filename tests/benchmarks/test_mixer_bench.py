"""The per-mixer benchmark's dry run on the CPU: every row measured or its error recorded, JSON written."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import mixer_bench  # noqa: E402

TINY = ["--device", "cpu", "--tiny", "--lengths", "16,32", "--tokens", "32", "--steps", "1", "--warmup", "1"]


def test_tiny_dry_run_measures_each_mixer_against_attention(tmp_path, capsys):
    rows = mixer_bench.main(TINY + ["--mixers", "gated_deltanet,attention,mamba2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "mixer_bench.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert [(r["mixer"], r["T"], r["B"]) for r in rows] == [
        ("attention", 16, 2), ("attention", 32, 1), ("gated_deltanet", 16, 2), ("gated_deltanet", 32, 1),
        ("mamba2", 16, 2), ("mamba2", 32, 1)]  # attention first: the reference of every ratio
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["tok_s"] == pytest.approx(r["B"] * r["T"] / (r["ms"] / 1e3))
        assert r["host_ms"] == pytest.approx(r["ms"])  # on the CPU the host's time is the time
        assert r["vs_attention"] == pytest.approx(r["tok_s"] / next(
            a["tok_s"] for a in rows if a["mixer"] == "attention" and a["T"] == r["T"]))
    by_mixer = {r["mixer"]: r["backend"] for r in rows}
    assert by_mixer["gated_deltanet"] == "delta_rule:torch, norm_gate:torch, short_conv:torch"  # the CPU runs the torch forms
    assert by_mixer["mamba2"] == "gla:torch, short_conv:torch"
    assert by_mixer["attention"] == "torch (SDPA)"
    assert "ms fwd+bwd" in capsys.readouterr().out


def _failing(monkeypatch, mixer: str, message: str):
    """Make building ``mixer`` raise ``message``; returns the real builder."""
    real = mixer_bench.build_mixer

    def flaky(name, *a):
        if name == mixer:
            raise RuntimeError(message)
        return real(name, *a)

    monkeypatch.setattr(mixer_bench, "build_mixer", flaky)
    return real


def test_a_failing_mixer_keeps_the_table(tmp_path, monkeypatch, capsys):
    _failing(monkeypatch, "gla", "CUDA out of memory (simulated)")
    rows = mixer_bench.main(TINY + ["--lengths", "16", "--mixers", "gla,linear_attention", "--out", str(tmp_path)])
    assert "out of memory" in rows[0]["error"] and rows[0]["mixer"] == "gla"
    assert "ms" in rows[1] and "error" not in rows[1]
    assert "ERROR RuntimeError('CUDA out of memory" in capsys.readouterr().out


def test_spent_budget_skips_and_bad_names_are_refused(tmp_path):
    rows = mixer_bench.main(TINY + ["--mixers", "gla", "--budget-s", "0", "--out", str(tmp_path)])
    assert all(r["error"] == "skipped: --budget-s spent" for r in rows) and len(rows) == 2
    with pytest.raises(SystemExit):
        mixer_bench.main(TINY + ["--mixers", "not_a_mixer", "--out", str(tmp_path)])


def test_every_registered_mixer_runs_in_the_dry_run(tmp_path):
    rows = mixer_bench.main(["--device", "cpu", "--tiny", "--lengths", "16", "--tokens", "16", "--steps", "1",
                             "--warmup", "1", "--out", str(tmp_path)])
    assert {r["mixer"] for r in rows} == set(mixer_bench.available_mixers())
    assert [r for r in rows if "error" in r] == []


def test_resume_keeps_measured_rows_and_runs_the_rest(tmp_path, monkeypatch):
    """A table that outlasts one device call: the second call keeps the first call's measured rows (marked
    with their origin), runs only what is missing or failed, and refuses a file from another setup."""
    first = tmp_path / "first"
    real = _failing(monkeypatch, "gla", "simulated failure")
    mixer_bench.main(TINY + ["--lengths", "16", "--mixers", "attention,gla", "--out", str(first)])
    monkeypatch.setattr(mixer_bench, "build_mixer", real)
    ran = []
    monkeypatch.setattr(mixer_bench, "run_one", lambda m, T, *a: ran.append((m, T)) or {"mixer": m, "T": T, "B": 1,
                                                                                         "ms": 1.0, "tok_s": 16e3})
    rows = mixer_bench.main(TINY + ["--lengths", "16", "--mixers", "attention,gla,mamba2", "--out", str(tmp_path),
                                    "--resume", str(first / "mixer_bench.json")])
    assert ran == [("gla", 16), ("mamba2", 16)]  # attention kept; the failed gla row runs again
    assert rows[0]["mixer"] == "attention" and "resumed_from" in rows[0] and rows[0]["ms"] > 0
    assert rows[1]["vs_attention"] == pytest.approx(16e3 / rows[0]["tok_s"])
    other = json.loads((first / "mixer_bench.json").read_text())
    other["environment"]["torch"] = "0.0"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="torch='0.0'"):
        mixer_bench.main(TINY + ["--lengths", "16", "--mixers", "attention", "--out", str(tmp_path),
                                 "--resume", str(tmp_path / "other.json")])


@pytest.mark.parametrize("op,decay,label", [("gla", "scalar", "fla+ours"), ("delta_rule", "scalar", "fla+ours"),
                                            ("gla", "vector", "fla")])
def test_recorded_backend_label_never_reaches_the_op(monkeypatch, op, decay, label):
    """On Hopper + Triton 3.6 the table labels gated kernels "fla+ours" (our backward step inside fla's), but the op
    itself must still be told "fla": handing it the label failed every gated mixer on the H100 (the first run)."""
    from linear_moe.ops import backends

    monkeypatch.setattr(backends, "resolve_backend", lambda op_name, backend=None, device="cpu", dtype=None, **f: "fla")
    monkeypatch.setattr(backends, "hopper_dqkwg_bug", lambda capability, triton: True)
    monkeypatch.setattr(backends, "cuda_capability", lambda device: (9, 0))
    seen: dict = {}
    with mixer_bench.record_backends(seen):
        assert backends.resolve_backend(op, None, "cuda", None, decay=decay, requires_grad=True) == "fla"
    assert seen == {op: {label}}
    assert mixer_bench.describe_backends("gsa", seen) == f"{op}:{label}"


def test_host_profile_names_where_the_host_time_goes(tmp_path):
    """At the asked lengths a row carries the host's profile: a per-step total, then functions by own time, our
    layer's forward among them; other lengths carry none."""
    rows = mixer_bench.main(TINY + ["--mixers", "gated_deltanet", "--host-profile-lengths", "32", "--out", str(tmp_path)])
    by_t = {(r["mixer"], r["T"]): r for r in rows}
    assert "host_profile" not in by_t[("gated_deltanet", 16)]
    prof = by_t[("gated_deltanet", 32)]["host_profile"]
    assert prof[0][0] == "TOTAL" and prof[0][1] > 0
    entries = prof[1:]
    assert 0 < len(entries) <= 12 and all(ms >= 0 and calls > 0 for _, ms, calls in entries)
    assert [ms for _, ms, _ in entries] == sorted((ms for _, ms, _ in entries), reverse=True)
    assert sum(ms for _, ms, _ in entries) <= prof[0][1] + 1e-6


def _busy() -> int:
    return sum(i * i for i in range(2000))


def test_host_profile_counts_calls_per_step():
    prof = mixer_bench.host_profile(lambda: [_busy() for _ in range(4)], steps=2, top=1000)
    busy = [row for row in prof[1:] if row[0].startswith("_busy (test_mixer_bench.py:")]
    assert len(busy) == 1 and busy[0][2] == 4.0 and busy[0][1] > 0


def test_sync_points_name_the_line_that_waited_and_restore_the_mode():
    """PyTorch's sync debug mode warns at each synchronising call; the step's sync points come back by file:line
    and count, other warnings are not counted, and the mode is reset even when the step raises."""
    import warnings

    modes = []

    def step():
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")

    found = mixer_bench.sync_points(step, set_mode=modes.append)
    assert list(found.values()) == [2] and next(iter(found)).startswith("test_mixer_bench.py:")
    assert modes == ["warn", "default"]

    def failing():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        mixer_bench.sync_points(failing, set_mode=modes.append)
    assert modes[-1] == "default"
