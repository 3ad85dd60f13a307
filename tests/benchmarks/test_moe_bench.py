"""moe_bench times what a training step pays: every timed fwd+bwd starts from empty gradients."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import moe_bench  # noqa: E402


def test_each_timed_step_starts_from_empty_gradients(monkeypatch):
    """Accumulating into last step's gradients charged the MoE layer a read-add-write of all its experts' weight
    gradients per step (0.41 ms on the H100): after two steps the gradients are one step's, not two steps' sum."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, generator=g, requires_grad=True)
    monkeypatch.setattr(moe_bench, "_params", list(lin.parameters()))
    lin(x).float().sum().backward()
    once = (lin.weight.grad.clone(), x.grad.clone())
    moe_bench.bench(lambda: moe_bench.fwd_bwd(lin, x), x.device, n_warm=1, n=2)
    torch.testing.assert_close(lin.weight.grad, once[0])
    torch.testing.assert_close(x.grad, once[1])


def test_graph_timing_needs_cuda(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["moe_bench.py", "--device", "cpu", "--graph"])
    with pytest.raises(SystemExit, match="--graph captures CUDA graphs: it needs --device cuda, got --device cpu"):
        moe_bench.main()


def test_measuring_saved_activations_frees_the_graph():
    """The saved-tensor probe must not keep the forward's graph alive: a pack hook that handed back the tensor
    itself tied saved outputs to their own grad_fn, and the leaked AccumulateGrad nodes (made on the default
    stream) later broke the graphed rows' CUDA-graph capture on the H100."""
    import gc
    import weakref

    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    refs = []

    def fn(t):
        y = torch.sigmoid(lin(t))  # sigmoid saves its own output
        refs.append(weakref.ref(y))
        return y

    assert moe_bench.saved_activation_mib(fn, x) > 0
    gc.collect()
    assert refs[0]() is None
