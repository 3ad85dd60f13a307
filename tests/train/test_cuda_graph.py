"""capture_step: one training step recorded as a CUDA graph and replayed gives the eager step's losses and
weights. The replay itself needs a GPU (skipped here; run by benchmarks/gpu_session.sh PARTS=tests)."""
import pytest
import torch

from linear_moe.layers.config import AttentionConfig
from linear_moe.model.causal_lm import LinearMoEForCausalLM
from linear_moe.model.config import ModelConfig
from linear_moe.moe.config import MoEConfig
from linear_moe.train.cuda_graph import capture, capture_step

KINDS = {"gdn": ("gated_deltanet", "LL"), "attention": ("attention", "NN"), "hybrid": ("gated_deltanet", "LN")}


def _model(kind, device):
    mixer, pattern = KINDS[kind]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, mixer=mixer, layer_pattern=pattern,
                      intermediate_size=128, attention=AttentionConfig(num_heads=2),
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=64))
    return LinearMoEForCausalLM(cfg).to(device)


def test_the_optimizer_must_be_capturable():
    model = _model("gdn", "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="capturable=True"):
        capture_step(lambda: torch.zeros(()), opt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", list(KINDS))
def test_replayed_steps_match_eager_steps(kind, monkeypatch):
    monkeypatch.setenv("LINEAR_MOE_KERNEL_BACKEND", "torch")  # no fla autotuning in a unit test
    batches = torch.randint(0, 128, (6, 2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    runs = {}
    for graphed in (False, True):
        model = _model(kind, "cuda")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
        x = batches[0].clone()

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                loss = model(x, labels=torch.roll(x, -1, 1), return_logits=False).loss
            loss.backward()
            opt.step()
            return loss.detach()

        losses = []
        if graphed:
            replay = capture_step(step, opt, warmup=2)  # the warm-up ran batches[0] twice
            losses += [None, None]
            for b in batches[2:]:
                x.copy_(b)
                losses.append(float(replay()))
        else:
            for i, b in enumerate(batches):
                x.copy_(batches[0] if i < 2 else b)
                opt.zero_grad(set_to_none=True)
                losses.append(float(step()))
        runs[graphed] = (losses[2:], [p.detach().float().clone() for p in model.parameters()])
    (eager_losses, eager_params), (graph_losses, graph_params) = runs[False], runs[True]
    assert graph_losses == pytest.approx(eager_losses, rel=1e-3)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(eager_params, graph_params))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal")
def test_capture_needs_cuda():
    with pytest.raises(RuntimeError, match="capture needs a CUDA device"):
        capture(lambda: torch.zeros(()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_forward_backward_replays_with_new_inputs():
    """capture (no optimizer): a layer's forward and backward recorded once; each replay reads the static input's
    current values and rewrites the loss and gradient tensors it returns, as eager runs compute them."""
    lin = torch.nn.Linear(16, 8).cuda()
    x = torch.randn(4, 16, device="cuda")

    def fwd_bwd():
        lin.weight.grad = None  # backward allocates it afresh (in the graph's pool when captured)
        out = lin(x).square().sum()
        out.backward()
        return out.detach(), lin.weight.grad

    replay = capture(fwd_bwd, warmup=2)
    for seed in range(2):
        x.copy_(torch.randn(4, 16, generator=torch.Generator().manual_seed(seed)).cuda())
        loss, grad = replay()
        got = (float(loss), grad.clone())
        want = fwd_bwd()
        torch.testing.assert_close(got[0], float(want[0]))
        torch.testing.assert_close(got[1], want[1])
