"""The preallocated KV cache of the softmax-attention mixer: decoding token by token (and chunk by chunk)
equals the full forward, through cache growth past capacity, with grouped-query heads and sliding windows;
left-padded ragged batches equal each row alone; the one-token step keeps its buffers (CUDA-graph ready)
and reads nothing on the host."""
import math

import pytest
import torch

from layer_testing import generator, jittered, rel_err
from linear_moe.layers import AttentionConfig, MixerConfig, build_mixer
from linear_moe.layers.attention import (CACHE_ROUND, cache_capacity, cache_mask, cached_attention,
                                         reserve_kv_cache, stack_kv_caches)
from linear_moe.model.causal_lm import LinearMoEForCausalLM
from linear_moe.model.config import ModelConfig
from linear_moe.moe.config import MoEConfig

HIDDEN = 32
TOL = 1e-6  # apply_rotary rotates in fp32 even for fp64 inputs
CASES = {
    "mha": AttentionConfig(num_heads=2),
    "gqa": AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8),
    "gqa+window": AttentionConfig(num_heads=4, num_kv_heads=1, head_dim=8, sliding_window=5),
}


def _layer(att: AttentionConfig, g: torch.Generator) -> torch.nn.Module:
    return jittered(build_mixer("attention", HIDDEN, MixerConfig(), att, 0, 2), g).double().eval()


def reference_attention(layer, x: torch.Tensor) -> torch.Tensor:
    """Float64, one query at a time: softmax over every earlier key (within the window) of its own row.
    x ``[B, T, hidden]`` → ``[B, T, hidden]``. Rotary written out here (half-split convention)."""
    B, T, _ = x.shape
    H, KV, D, W = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.window
    q = layer.q_proj(x).view(B, T, H, D)
    k = layer.k_proj(x).view(B, T, KV, D)
    v = layer.v_proj(x).view(B, T, KV, D)
    freq = layer.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freq            # [T, D/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]

    def rot(t):
        a, b = t[..., :D // 2], t[..., D // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    q, k = rot(q), rot(k)
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for t in range(T):
        lo = max(0, t - W + 1) if W else 0
        for h in range(H):
            kh = h // (H // KV)
            scores = (k[:, lo:t + 1, kh] @ q[:, t, h, :, None]).squeeze(-1) / math.sqrt(D)   # [B, S]
            out[:, t, h] = (scores.softmax(-1)[..., None] * v[:, lo:t + 1, kh]).sum(1)
    return layer.o_proj(out.reshape(B, T, H * D))


@pytest.mark.parametrize("kernel", ["auto", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_token_by_token_decode_through_growth_equals_the_reference(case, kernel):
    g = generator()
    layer = _layer(CASES[case], g)
    layer.decode_kernel = kernel  # auto: the matmul form for one token
    T, prompt = CACHE_ROUND + 12, 5           # decodes past the first capacity: one regrowth (windowed: a compaction)
    x = torch.randn(2, T, HIDDEN, generator=g, dtype=torch.float64)
    with torch.no_grad():
        want = reference_attention(layer, x)
        full, _ = layer(x)
        y, state = layer(x[:, :prompt])
        ys = [y]
        for t in range(prompt, T):
            y, state = layer(x[:, t:t + 1], state)
            ys.append(y)
    assert rel_err(full, want) < TOL
    assert rel_err(torch.cat(ys, 1), want) < TOL
    window = CASES[case].sliding_window
    assert state["used"] == T if not window else state["used"] < CACHE_ROUND  # a window dropped old slots when full
    assert state["offset"].tolist() == [T, T] and int(state["slot"]) == state["used"]


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_continuation_equals_the_reference(case):
    g = generator()
    layer = _layer(CASES[case], g)
    x = torch.randn(2, 23, HIDDEN, generator=g, dtype=torch.float64)
    with torch.no_grad():
        want = reference_attention(layer, x)
        state, ys = None, []
        for lo, hi in ((0, 4), (4, 11), (11, 12), (12, 23)):
            y, state = layer(x[:, lo:hi], state)
            ys.append(y)
    assert rel_err(torch.cat(ys, 1), want) < TOL


@pytest.mark.parametrize("case", list(CASES))
def test_left_padded_ragged_batch_equals_each_row_alone(case):
    g = generator()
    layer = _layer(CASES[case], g)
    lengths, new = [3, 9, 1], 6
    xs = [torch.randn(1, n + new, HIDDEN, generator=g, dtype=torch.float64) for n in lengths]
    with torch.no_grad():
        rows = [layer(x[:, :n])[1] for x, n in zip(xs, lengths)]
        state = stack_kv_caches(rows)
        assert state["start"].tolist() == [state["used"] - r["used"] for r in rows]
        got = []
        for t in range(new):
            step = torch.cat([x[:, n + t:n + t + 1] for x, n in zip(xs, lengths)])
            y, state = layer(step, state)
            got.append(y)
        got = torch.cat(got, 1)
        for b, (x, n) in enumerate(zip(xs, lengths)):
            assert rel_err(got[b:b + 1], reference_attention(layer, x)[:, n:]) < TOL


def test_one_token_step_writes_in_place_when_capacity_allows():
    g = generator()
    layer = _layer(CASES["gqa"], g)
    with torch.no_grad():
        _, state = layer(torch.randn(2, 7, HIDDEN, generator=g, dtype=torch.float64))
        state = reserve_kv_cache(state, 100)
        assert state["k"].shape[2] == cache_capacity(100) == 2 * CACHE_ROUND
        ptrs = state["k"].data_ptr(), state["v"].data_ptr()
        for _ in range(3):
            _, state = layer(torch.randn(2, 1, HIDDEN, generator=g, dtype=torch.float64), state)
        assert (state["k"].data_ptr(), state["v"].data_ptr()) == ptrs and state["used"] == 10


def test_bad_kernel_is_refused():
    q = torch.zeros(1, 1, 2, 4)
    k = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="kernel='flash'"):
        cached_attention(q, k, k, torch.tensor(0), torch.zeros(1, dtype=torch.long), kernel="flash")


def test_cache_mask_marks_the_valid_slots():
    mask = cache_mask(torch.tensor(4), torch.tensor([0, 2]), 2, 8, window=3)[:, 0]
    want_row0 = [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0]]
    assert mask[0].int().tolist() == want_row0
    assert mask[1].int().tolist() == want_row0  # start 2 is outside the window already
    mask = cache_mask(torch.tensor(4), torch.tensor([0, 3]), 1, 8)[:, 0, 0]
    assert mask.int().tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]]


# ---- no host sync in the one-token step -----------------------------------------------------------

from host_sync import no_host_sync  # noqa: E402  (tests/conftest.py puts tests/ on the path)


def test_the_detector_catches_a_sync(monkeypatch):
    with pytest.raises(AssertionError, match="host sync"), no_host_sync(monkeypatch):
        int(torch.tensor(3))
    with pytest.raises(AssertionError, match="host sync"), no_host_sync(monkeypatch):
        torch.tensor([1, 0]).nonzero()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kernel", ["matmul", "sdpa"])
def test_one_token_attention_step_makes_no_host_sync(monkeypatch, case, kernel):
    g = generator()
    layer = _layer(CASES[case], g)
    layer.decode_kernel = kernel
    with torch.no_grad():
        rows = [layer(torch.randn(1, n, HIDDEN, generator=g, dtype=torch.float64))[1] for n in (2, 6)]
        state = reserve_kv_cache(stack_kv_caches(rows), 64)
        x = torch.randn(2, 1, HIDDEN, generator=g, dtype=torch.float64)
        with no_host_sync(monkeypatch):
            layer(x, state)


def test_one_token_model_step_makes_no_host_sync(monkeypatch):
    """The whole decode step of an attention model with dense MLPs (the MoE layer has its own sync test)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    cfg = ModelConfig(vocab_size=64, hidden_size=HIDDEN, num_layers=2, mixer="attention", layer_pattern="NN",
                      ffn_pattern="DD", intermediate_size=48, attention=CASES["gqa"],
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16))
    model = LinearMoEForCausalLM(cfg).eval()
    from linear_moe.model.generation import reserve_caches
    with torch.no_grad():
        out = model(torch.randint(0, 64, (2, 5)), return_states=True)
        states = reserve_caches(out.states, 8)
        token = out.logits[:, -1:].argmax(-1)
        with no_host_sync(monkeypatch):
            out = model(token, states=states, return_states=True)
            out.logits[:, -1:].argmax(-1)
