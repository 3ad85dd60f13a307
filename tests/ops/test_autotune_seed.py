"""Shipped Triton autotuning results: copied into Triton's cache for the matching GPU stack only, whole files,
never over the user's own, once per process; bad members skipped; the switch refuses unknown values."""
import io
import json
import tarfile

import pytest

from linear_moe.ops.backends import tuning


def _tarball(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A stand-in shipped folder with one tarball for (sm90, Triton 3.6.0, fla 0.6.0)."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    good = json.dumps({"key": [64, "torch.bfloat16"], "configs_timings": []})
    _tarball(folder / "sm90.tgz", {"AAA/chunk_fwd_kernel_h.autotune.json": good,
                                   "BBB/chunk_bwd_kernel_dh.autotune.json": good,
                                   "../escape.autotune.json": good, "CCC/readme.txt": "not a result",
                                   "DDD/deeper/x.autotune.json": good})
    monkeypatch.setattr(tuning, "SHIPPED_DIR", folder)
    monkeypatch.setattr(tuning, "SHIPPED", {(9, "3.6.0", "0.6.0"): "sm90.tgz"})
    monkeypatch.setattr(tuning, "_seeded", {})
    monkeypatch.delenv(tuning.ENV_VAR, raising=False)
    return good


def test_seeds_the_matching_stack_and_keeps_the_users_files(shipped, tmp_path):
    cache = tmp_path / "cache"
    (cache / "BBB").mkdir(parents=True)
    (cache / "BBB" / "chunk_bwd_kernel_dh.autotune.json").write_text("mine")
    assert tuning.seed_triton_cache((9, 0), "3.6.0", "0.6.0", cache) == 1
    assert json.loads((cache / "AAA" / "chunk_fwd_kernel_h.autotune.json").read_text())["key"] == [64, "torch.bfloat16"]
    assert (cache / "BBB" / "chunk_bwd_kernel_dh.autotune.json").read_text() == "mine"
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()) == [
        "AAA/chunk_fwd_kernel_h.autotune.json", "BBB/chunk_bwd_kernel_dh.autotune.json"]  # nothing else, no temp files
    assert not (tmp_path / "escape.autotune.json").exists()
    (cache / "AAA" / "chunk_fwd_kernel_h.autotune.json").unlink()
    assert tuning.seed_triton_cache((9, 0), "3.6.0", "0.6.0", cache) == 1  # once per process and folder
    assert not (cache / "AAA" / "chunk_fwd_kernel_h.autotune.json").exists()


@pytest.mark.parametrize("capability, triton, fla", [((8, 0), "3.6.0", "0.6.0"), ((9, 0), "3.7.1", "0.6.0"),
                                                     ((9, 0), "3.6.0", "0.5.0"), (None, "3.6.0", "0.6.0"),
                                                     ((9, 0), None, None)])
def test_other_stacks_are_left_alone(shipped, tmp_path, capability, triton, fla):
    assert tuning.seed_triton_cache(capability, triton, fla, tmp_path / "cache") == 0
    assert not (tmp_path / "cache").exists()


def test_switched_off_and_bad_switch(shipped, tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.ENV_VAR, "0")
    assert tuning.seed_triton_cache((9, 0), "3.6.0", "0.6.0", tmp_path / "cache") == 0
    monkeypatch.setenv(tuning.ENV_VAR, "yes")
    with pytest.raises(ValueError, match="LINEAR_MOE_FLA_TUNING='yes' is not understood; allowed: '1'.*'0'"):
        tuning.seed_triton_cache((9, 0), "3.6.0", "0.6.0", tmp_path / "cache")


def test_overwrite_for_an_explicit_restore(shipped, tmp_path):
    cache = tmp_path / "cache"
    (cache / "AAA").mkdir(parents=True)
    (cache / "AAA" / "chunk_fwd_kernel_h.autotune.json").write_text("old")
    assert tuning.unpack_autotune_results(tuning.SHIPPED_DIR / "sm90.tgz", cache, overwrite=True) == 2
    assert (cache / "AAA" / "chunk_fwd_kernel_h.autotune.json").read_text() == shipped


def test_the_package_ships_results_for_the_gpu_image():
    """The real shipped file: present, and every member a Triton autotuning result of one kernel (the H100 set)."""
    path = tuning.shipped_tarball((9, 0), "3.6.0", "0.6.0")
    assert path is not None and path.is_file()
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        assert len(members) > 200 and all(m.name.endswith(".autotune.json") for m in members)
        sample = json.load(tar.extractfile(members[0]))
        assert {"key", "configs_timings"} <= set(sample)


def test_a_damaged_shipped_file_or_an_unwritable_cache_leaves_tuning_as_before(shipped, tmp_path, monkeypatch):
    (tuning.SHIPPED_DIR / "sm90.tgz").write_bytes(b"not a tarball")
    assert tuning.seed_triton_cache((9, 0), "3.6.0", "0.6.0", tmp_path / "cache") == 0
    monkeypatch.setattr(tuning, "_seeded", {})
    _tarball(tuning.SHIPPED_DIR / "sm90.tgz", {"AAA/k.autotune.json": shipped})
    blocker = tmp_path / "file_not_folder"
    blocker.write_text("")
    assert tuning.seed_triton_cache((9, 0), "3.6.0", "0.6.0", blocker / "cache") == 0
