"""The command line: verbs, overrides, and one-line errors with exit code 2 that write nothing."""
import subprocess
import sys

import pytest

from linear_moe.cli import main, split_overrides


def test_split_overrides():
    rest, ov = split_overrides(["--preset", "tiny", "--model.hidden_size", "512", "--train.lr=0.1", "--dry-run"])
    assert rest == ["--preset", "tiny", "--dry-run"]
    assert ov == [("model.hidden_size", "512"), ("train.lr", "0.1")]


@pytest.mark.parametrize("argv, needle", [
    (["train", "--preset", "huge", "--dry-run"], "unknown preset 'huge'; choose one of: tiny"),
    (["train", "--model.hidden_sise", "3", "--dry-run"], "unknown config key 'model.hidden_sise'"),
    (["train", "--model.mixer", "nope", "--dry-run"], "model.mixer='nope' is not a known token mixer"),
    (["generate", "--checkpoint", "/does/not/exist"], "checkpoint path '/does/not/exist' does not exist"),
])
def test_errors_are_one_line_and_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("linear-moe: error:") and needle in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_dry_run_prints_config_and_sizes(capsys):
    assert main(["train", "--dry-run", "--model.num_layers", "2", "--model.layer_pattern", "NN"]) == 0
    out = capsys.readouterr().out
    assert "[model]" in out and "num_layers = 2" in out and "active per token" in out


def test_presets_and_mixers_list(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "A0.3B-2B" in out
    assert main(["mixers"]) == 0
    assert "attention" in capsys.readouterr().out.split()


def test_console_module_runs():
    proc = subprocess.run([sys.executable, "-m", "linear_moe", "config", "--train.seq_len", "48"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "seq_len = 48" in proc.stdout
