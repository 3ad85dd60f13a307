"""Backend resolver: choice rules, forced backends, env var, known-bad Hopper/Triton range."""

import pytest
import torch

import linear_moe.ops.backends as bk


@pytest.fixture
def gpu(monkeypatch):
    """Pretend to be on a CUDA machine with fla + Triton; returns a setter for the versions."""
    env = {"cap": (9, 0), "triton": "3.6.0", "fla": "0.6.0"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bk, "cuda_capability", lambda device: env["cap"])
    monkeypatch.setattr(bk, "triton_version", lambda: env["triton"])
    monkeypatch.setattr(bk, "fla_version", lambda: env["fla"])
    monkeypatch.delenv(bk.ENV_VAR, raising=False)
    monkeypatch.delenv("FLA_DISABLE_BACKEND_DISPATCH", raising=False)
    return env


def test_cpu_picks_torch_and_imports_nothing(monkeypatch):
    monkeypatch.delenv(bk.ENV_VAR, raising=False)
    assert bk.resolve_backend("gla", None, "cpu", torch.float32, decay="vector") == "torch"
    assert bk.resolve_backend("delta_rule", "auto", torch.device("cpu")) == "torch"
    assert bk.resolve_backend("short_conv", "torch", "cpu") == "torch"


def test_forced_fla_on_cpu_raises_naming_why(monkeypatch):
    monkeypatch.delenv(bk.ENV_VAR, raising=False)
    with pytest.raises(RuntimeError, match="'fla' cannot run gla: fla needs a CUDA device"):
        bk.resolve_backend("gla", "fla", "cpu")
    with pytest.raises(RuntimeError, match="'triton' cannot run delta_rule: .*not built yet"):
        bk.resolve_backend("delta_rule", "triton", "cpu")


def test_env_var_overrides_auto_but_not_explicit(monkeypatch):
    monkeypatch.setenv(bk.ENV_VAR, "fla")
    with pytest.raises(RuntimeError, match="fla needs a CUDA device"):
        bk.resolve_backend("gla", None, "cpu")
    assert bk.resolve_backend("gla", "torch", "cpu") == "torch"
    monkeypatch.setenv(bk.ENV_VAR, "torch")
    assert bk.resolve_backend("gla", "auto", "cpu") == "torch"
    monkeypatch.setenv(bk.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="LINEAR_MOE_KERNEL_BACKEND='cuda'"):
        bk.resolve_backend("gla", None, "cpu")


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="backend='tilelang'.*allowed"):
        bk.resolve_backend("gla", "tilelang", "cpu")
    with pytest.raises(ValueError, match="op_name='attention'"):
        bk.resolve_backend("attention", None, "cpu")
    with pytest.raises(ValueError, match="decay='diag'"):
        bk.resolve_backend("gla", None, "cpu", decay="diag")


def test_cuda_auto_prefers_fla(gpu):
    for decay in bk.DECAY_KINDS:
        assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16, decay=decay) == "fla"
    assert bk.resolve_backend("delta_rule", None, "cuda", torch.bfloat16, decay="scalar") == "fla"


def test_cuda_without_fla(gpu):
    gpu["fla"] = None
    assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16) == "torch"
    with pytest.raises(RuntimeError, match="fla-core is not installed"):
        bk.resolve_backend("gla", "fla", "cuda", torch.bfloat16)


def test_unsupported_shapes_and_dtypes_fall_to_torch_in_auto(gpu):
    assert bk.resolve_backend("gla", None, "cuda", torch.float64) == "torch"
    assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16, k_dim=512) == "torch"
    with pytest.raises(RuntimeError, match="head dims up to 256, got k_dim=512"):
        bk.resolve_backend("gla", "fla", "cuda", torch.bfloat16, k_dim=512)


@pytest.mark.parametrize("version,bad", [("3.3.1", False), ("3.4.0", True), ("3.6.0", True),
                                         ("3.7.0", True), ("3.7.1", False), ("3.8.0+git1", False)])
def test_hopper_range(version, bad):
    assert bk.hopper_dqkwg_bug((9, 0), version) is bad
    assert bk.hopper_dqkwg_bug((8, 0), version) is False  # Ampere is unaffected
    assert bk.hopper_dqkwg_bug((10, 0), version) is False
    assert bk.hopper_dqkwg_bug(None, version) is False


def test_known_bad_only_when_fix_cannot_plug_in(gpu, monkeypatch):
    feats = dict(decay="scalar", requires_grad=True)
    # fix plugs into fla's dispatch: gated ops stay on fla even on Hopper + Triton 3.6
    assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16, **feats) == "fla"
    monkeypatch.setenv("FLA_DISABLE_BACKEND_DISPATCH", "1")
    assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16, **feats) == "torch"
    assert bk.resolve_backend("delta_rule", None, "cuda", torch.bfloat16, **feats) == "torch"
    with pytest.raises(RuntimeError, match=r"known-bad.*Triton 3\.6\.0.*#640"):
        bk.resolve_backend("delta_rule", "fla", "cuda", torch.bfloat16, **feats)
    # not affected: inference, vector gates (own kernels), ungated, other GPUs / Triton
    assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16, decay="scalar",
                              requires_grad=False) == "fla"
    assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16, decay="vector") == "fla"
    assert bk.resolve_backend("delta_rule", None, "cuda", torch.bfloat16, decay="none") == "fla"
    gpu["triton"] = "3.7.1"
    assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16, **feats) == "fla"
    gpu["triton"], gpu["cap"] = "3.6.0", (8, 0)
    assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16, **feats) == "fla"


def test_small_key_width_skips_our_gated_backward_where_it_is_in_use(gpu, monkeypatch):
    """Our #640 replacement runs key tiles of 16 columns and up (checked on the H100 at 16 - 128): narrower keys take
    the torch backend on the affected devices (auto), a forced fla says why; elsewhere fla keeps them."""
    small = dict(decay="scalar", requires_grad=True, k_dim=8)
    assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16, **small) == "torch"
    assert bk.resolve_backend("delta_rule", None, "cuda", torch.bfloat16, **small) == "torch"
    assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16, **{**small, "k_dim": 16}) == "fla"
    with pytest.raises(RuntimeError, match=r"gated backward step.*k_dim >= 16 only, got k_dim=8"):
        bk.resolve_backend("gla", "fla", "cuda", torch.bfloat16, **small)
    # not our kernel: inference, vector gates, ungated; or fla's own kernel is fine (Triton 3.7.1, Ampere)
    assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16, **{**small, "requires_grad": False}) == "fla"
    assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16, **{**small, "decay": "vector"}) == "fla"
    assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16, **{**small, "decay": "none"}) == "fla"
    gpu["triton"] = "3.7.1"
    assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16, **small) == "fla"
    gpu["triton"], gpu["cap"] = "3.6.0", (8, 0)
    assert bk.resolve_backend("gla", None, "cuda", torch.bfloat16, **small) == "fla"


def test_get_backend():
    with pytest.raises(ValueError, match="'torch' lives beside the public ops"):
        bk.get_backend("torch")
    with pytest.raises(ValueError, match="backend='x' is unknown"):
        bk.get_backend("x")
    if torch.cuda.is_available():
        pytest.importorskip("fla")
        assert callable(bk.get_backend("fla").gla)


def test_version_parsing():
    assert bk._version_tuple("3.6.0") == (3, 6, 0)
    assert bk._version_tuple("3.7") == (3, 7, 0)
    assert bk._version_tuple("3.4.0rc1+gitabc") == (3, 4, 0)


def test_fp32_delta_rule_is_not_sent_to_fla(monkeypatch):
    """fla 0.6.0 raises on float32 delta-rule inputs: auto must choose torch, a forced fla must say why."""
    from linear_moe.ops import backends as b

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(b, "fla_version", lambda: "0.6.0")
    monkeypatch.setattr(b, "triton_version", lambda: "3.6.0")
    reason = b.why_not("fla", "delta_rule", torch.device("cuda"), torch.float32)
    assert reason is not None and "float32" in reason
    assert b.why_not("fla", "delta_rule", torch.device("cuda"), torch.bfloat16) is None
    assert b.why_not("fla", "gla", torch.device("cuda"), torch.float32) is None
