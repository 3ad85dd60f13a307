"""warm_kernels.py --pack: the tuning tarball is written whole or not at all, and never emptied by a stray pack."""
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import warm_kernels  # noqa: E402


def test_pack_writes_whole_and_an_empty_cache_keeps_the_last_tarball(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "ab").mkdir(parents=True)
    (cache / "ab" / "k.autotune.json").write_text('{"configs": []}')
    (cache / "ab" / "k.cubin").write_bytes(b"\0")  # compiled kernels do not travel
    monkeypatch.setattr(warm_kernels, "cache_dir", lambda: cache)
    out = tmp_path / "tune.tgz"
    assert warm_kernels.pack(out) == 1
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["ab/k.autotune.json"]
    assert not (tmp_path / "tune.tgz.tmp").exists()
    monkeypatch.setattr(warm_kernels, "cache_dir", lambda: tmp_path / "empty")
    assert warm_kernels.pack(out) == 0
    with tarfile.open(out) as tar:  # still the one result, not an empty tarball
        assert tar.getnames() == ["ab/k.autotune.json"]
