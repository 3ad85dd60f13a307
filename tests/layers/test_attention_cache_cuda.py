"""On a GPU: the one-token attention step captured in a CUDA graph (the cache written in place at a
device-side slot) replays to the eager steps' outputs, and the eager step makes no host sync."""
import pytest
import torch

from layer_testing import generator, jittered, rel_err
from linear_moe.layers import AttentionConfig, MixerConfig, build_mixer
from linear_moe.layers.attention import reserve_kv_cache, stack_kv_caches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kernel", ["matmul", "sdpa"])
@pytest.mark.parametrize("att", [AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=32),
                                 AttentionConfig(num_heads=4, head_dim=32, sliding_window=7)])
def test_graph_replay_equals_eager_steps_and_no_sync(att, kernel):
    g = generator()
    layer = jittered(build_mixer("attention", 64, MixerConfig(), att, 0, 2), g).cuda().eval()
    layer.decode_kernel = kernel
    steps = 12
    xs = torch.randn(steps + 3, 2, 1, 64, generator=g).cuda()
    with torch.no_grad():
        rows = [layer(torch.randn(1, n, 64, generator=g).cuda())[1] for n in (5, 19)]
        start = reserve_kv_cache(stack_kv_caches(rows), 19 + steps + 3 + 1)
        eager_state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in start.items()}
        want = []
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in range(steps):
                y, eager_state = layer(xs[t], eager_state)
                want.append(y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in start.items()}
        x_in = xs[0].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for t in range(3):  # warm-up outside the capture, on throwaway copies
                scratch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in start.items()}
                layer(xs[t], scratch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_out, new = layer(x_in, state)
            for key in ("offset", "slot"):
                state[key].copy_(new[key])
        got = []
        for t in range(steps):
            x_in.copy_(xs[t])
            graph.replay()
            got.append(y_out.clone())
    assert rel_err(torch.cat(got, 1), torch.cat(want, 1)) < 1e-5
