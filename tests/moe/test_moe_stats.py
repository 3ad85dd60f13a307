"""Expert-load collection and the heatmap PNG."""
import pytest
import torch

from linear_moe.moe import MoEConfig, MoELayer, SwiGLUMLP, collect_expert_load, plot_expert_load


def test_collect_expert_load_stacks_layers_in_order():
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8)
    model = torch.nn.ModuleList([MoELayer(8, cfg), SwiGLUMLP(8, 16), MoELayer(8, cfg)])
    assert collect_expert_load(model).shape == (0, 0)
    x = torch.randn(3, 8)
    _, aux0 = model[0](x)
    _, aux2 = model[2](x[:2])
    load = collect_expert_load(model)
    assert load.shape == (2, 4)
    assert torch.equal(load[0], aux0.tokens_per_expert) and torch.equal(load[1], aux2.tokens_per_expert)
    assert load.sum(1).tolist() == [6, 4]


def test_plot_expert_load_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    history = [torch.randint(0, 20, (3, 6)).float() for _ in range(7)]
    path = plot_expert_load(history, tmp_path / "plots" / "load.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError, match="steps, layers, experts"):
        plot_expert_load([], tmp_path / "empty.png")
