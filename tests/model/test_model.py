"""The language model end to end on tiny shapes: forward/backward, learning, states, packing."""
import dataclasses

import pytest
import torch

from linear_moe.layers.config import AttentionConfig
from linear_moe.layers.registry import available_mixers
from linear_moe.model.causal_lm import LinearMoEForCausalLM
from linear_moe.model.config import ModelConfig
from linear_moe.moe.config import MoEConfig


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, num_layers=2, mixer="attention", intermediate_size=48,
                attention=AttentionConfig(num_heads=2), moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=24))
    base.update(kw)
    return ModelConfig(**base)


def test_forward_backward_shapes_and_losses():
    torch.manual_seed(0)
    model = LinearMoEForCausalLM(tiny_config())
    x = torch.randint(0, 97, (2, 16))
    out = model(x, labels=torch.roll(x, -1, 1))
    assert out.logits.shape == (2, 16, 97)
    assert torch.isfinite(out.loss)
    # Untrained: the LM loss is near log(vocab).
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5
    assert out.aux_losses, "MoE layers must report their auxiliary losses"
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + sum(v.item() for v in out.aux_losses.values()), rel=1e-6)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(1)
    model = LinearMoEForCausalLM(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 97, (4, 24))
    y = torch.roll(x, -1, 1)
    losses = []
    for _ in range(30):
        out = model(x, labels=y)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_dense_and_moe_layers_follow_the_ffn_pattern():
    model = LinearMoEForCausalLM(tiny_config(num_layers=3, ffn_pattern="DED"))
    assert [layer.is_moe for layer in model.layers] == [False, True, False]
    assert model.num_active_parameters() < model.num_parameters()


def test_tied_embeddings_share_storage():
    model = LinearMoEForCausalLM(tiny_config(tie_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    untied = LinearMoEForCausalLM(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()


def test_cu_seqlens_packing_equals_separate_documents():
    torch.manual_seed(2)
    model = LinearMoEForCausalLM(tiny_config()).eval()
    docs = [torch.randint(0, 97, (1, n)) for n in (5, 11, 7)]
    packed = torch.cat(docs, dim=1)
    cu = torch.tensor([0, 5, 16, 23])
    with torch.no_grad():
        joint = model(packed, cu_seqlens=cu).logits
        apart = torch.cat([model(d).logits for d in docs], dim=1)
    torch.testing.assert_close(joint, apart, rtol=1e-4, atol=1e-5)


def _greedy_matches_full_forward(cfg: ModelConfig, prompt_len=5, new=6):
    torch.manual_seed(3)
    model = LinearMoEForCausalLM(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, prompt_len))
    out = model.generate(prompt, new, temperature=0.0)
    assert out.shape == (2, prompt_len + new)
    with torch.no_grad():
        full = model(out).logits
    # every generated token is the argmax of the full (stateless) forward at the previous position
    assert torch.equal(full[:, prompt_len - 1:-1].argmax(-1), out[:, prompt_len:])
    # and the logits of the stateful path equal those of the full forward
    with torch.no_grad():
        step = model(out[:, :prompt_len], return_states=True)
        logits = [step.logits[:, -1]]
        for t in range(prompt_len, out.shape[1] - 1):
            step = model(out[:, t:t + 1], states=step.states, return_states=True)
            logits.append(step.logits[:, -1])
    torch.testing.assert_close(torch.stack(logits, 1), full[:, prompt_len - 1:-1], rtol=1e-4, atol=1e-4)


def test_generation_with_kv_cache_equals_full_forward():
    _greedy_matches_full_forward(tiny_config())


def test_generation_with_sliding_window_and_gqa():
    cfg = tiny_config(attention=AttentionConfig(num_heads=4, num_kv_heads=2, sliding_window=4))
    _greedy_matches_full_forward(cfg, prompt_len=6, new=7)


FAMILIES = ["qwen2", "deepseek_v2", "mixtral", "llama3"]


MIXER_PATTERNS = [("attention", "NN")] + [(m, p) for m in available_mixers() if m != "attention" for p in ("LL", "LN")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mixer, pattern", MIXER_PATTERNS)
def test_every_mixer_in_every_family_learns_and_generates(mixer, pattern, family):
    """A tiny model per (mixer, pure or hybrid pattern, family): a few steps lower the loss, and greedy
    generation with states equals the full forward. The README's mixer table is backed by these."""
    from linear_moe.model.presets import apply_family

    cfg = apply_family(tiny_config(mixer=mixer, layer_pattern=pattern), family)
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=4, top_k=2, n_group=1, topk_group=1))
    torch.manual_seed(4)
    model = LinearMoEForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    y = torch.roll(x, -1, 1)
    first = None
    for _ in range(8):
        out = model(x, labels=y)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else out.lm_loss.item()
    assert out.lm_loss.item() < first
    _greedy_matches_full_forward(cfg, prompt_len=4, new=4)


def test_chunked_loss_equals_the_full_logits_loss():
    from linear_moe.ops.cross_entropy import linear_cross_entropy

    torch.manual_seed(5)
    x = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    y[3] = -100
    ref = torch.nn.functional.cross_entropy(x @ w.t(), y, ignore_index=-100)
    got = linear_cross_entropy(x, w, y, chunk_size=8)
    gx, gw = torch.autograd.grad(ref, (x, w))
    hx, hw = torch.autograd.grad(got, (x, w))
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hx, gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(hw, gw, rtol=1e-5, atol=1e-7)
    model = LinearMoEForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 9))
    full = model(ids, labels=ids)
    chunked = model(ids, labels=ids, return_logits=False)
    assert chunked.logits is None
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-6)



def test_chunked_loss_gradients_reach_the_tied_embedding(monkeypatch):
    """The fused loss returns the head weight's gradient; with tied embeddings autograd adds it to the
    embedding's own: every parameter's gradient equals the one through the checkpointed loss (same math)
    and, to fp32 precision (that path's softmax is fp32), the one through the full logits."""
    import functools

    import linear_moe.model.causal_lm as causal_lm

    torch.manual_seed(6)
    model = LinearMoEForCausalLM(tiny_config(tie_embeddings=True)).double()
    assert model.lm_head.weight is model.embed.weight
    ids = torch.randint(0, 97, (2, 9))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100

    def grads(return_logits):
        model.zero_grad()
        model(ids, labels=labels, return_logits=return_logits).lm_loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused, full = grads(False), grads(True)
    monkeypatch.setattr(causal_lm, "linear_cross_entropy", functools.partial(causal_lm.linear_cross_entropy, fused=False))
    checkpointed = grads(False)
    assert fused.keys() == full.keys() == checkpointed.keys() and "embed.weight" in fused
    for name in fused:
        torch.testing.assert_close(fused[name], checkpointed[name], rtol=1e-10, atol=1e-14, msg=name)
        torch.testing.assert_close(fused[name], full[name], rtol=1e-5, atol=1e-7, msg=name)
