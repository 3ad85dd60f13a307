"""The training step (forward, loss, backward) of each model kind makes no host sync and copies no host data
to the device: the conditions for capturing it in one CUDA graph (benchmarks/model_bench.py ``@graph``).

On the H100 the softmax-attention and hybrid models first failed to capture: the attention layer built its
decoding cache's slot counter with ``torch.tensor(n, device=...)``, a host-to-device copy, on every call.
"""
import pytest
import torch

from linear_moe.layers.config import AttentionConfig
from linear_moe.model.causal_lm import LinearMoEForCausalLM
from linear_moe.model.config import ModelConfig
from linear_moe.moe.config import MoEConfig
from linear_moe.moe.experts import _grouped_mm_runs
from linear_moe.parallel.activation_checkpoint import apply_activation_checkpointing

from host_sync import no_host_sync  # noqa: E402  (tests/conftest.py puts tests/ on the path)

KINDS = {"gdn": ("gated_deltanet", "LL"), "gla": ("gla", "LL"), "attention": ("attention", "NN"),
         "hybrid": ("gated_deltanet", "LN")}


@pytest.mark.skipif(not _grouped_mm_runs(torch.device("cpu"), torch.float32),
                    reason="torch._grouped_mm does not run on this CPU build (the loop fallback syncs)")
@pytest.mark.parametrize("checkpointing", ["none", "selective"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_training_step_is_capturable(monkeypatch, kind, checkpointing):
    mixer, pattern = KINDS[kind]
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, mixer=mixer, layer_pattern=pattern,
                      intermediate_size=48, attention=AttentionConfig(num_heads=2),
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=24))
    model = apply_activation_checkpointing(LinearMoEForCausalLM(cfg).train(), checkpointing)
    x = torch.randint(0, 97, (2, 16))
    model(x, labels=torch.roll(x, -1, 1), return_logits=False).loss.backward()  # warm-up: one-time probes
    model.zero_grad(set_to_none=True)
    with no_host_sync(monkeypatch):
        out = model(x, labels=torch.roll(x, -1, 1), return_logits=False)
        out.loss.backward()
    assert torch.isfinite(out.loss.detach()).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
