"""benchmarks/provenance.py: the commit a results file names (GIT_COMMIT first: the device copy's git metadata lags its
files) and the digest of the sources that ran."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import provenance  # noqa: E402


def test_git_commit_prefers_the_environment(monkeypatch):
    monkeypatch.setenv("GIT_COMMIT", "9d63d2a")
    assert provenance.git_commit() == "9d63d2a"
    monkeypatch.delenv("GIT_COMMIT")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert provenance.git_commit() == head


def test_source_digest_follows_the_sources(tmp_path, monkeypatch):
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    first = provenance.source_digest()
    assert len(first) == 16 and int(first, 16) >= 0 and provenance.source_digest() == first
    (tmp_path / "src" / "pkg" / "a.py").write_text("x = 2\n")
    assert provenance.source_digest() != first
