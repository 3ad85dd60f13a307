"""The model's decode with preallocated attention caches equals its full forward (fp32 logits), through
cache growth past capacity, for attention-only and hybrid models, ragged batches included."""
import pytest
import torch

from linear_moe.layers.attention import CACHE_ROUND
from linear_moe.layers.config import AttentionConfig
from linear_moe.model.causal_lm import LinearMoEForCausalLM
from linear_moe.model.config import ModelConfig
from linear_moe.model.generation import stack_states, reserve_caches
from linear_moe.moe.config import MoEConfig

CASES = {
    "attention gqa": dict(mixer="attention", layer_pattern="NN", attention=AttentionConfig(num_heads=4, num_kv_heads=2)),
    "gdn + window": dict(mixer="gated_deltanet", layer_pattern="LN",
                         attention=AttentionConfig(num_heads=4, num_kv_heads=1, sliding_window=6)),
}


def _model(g: torch.Generator, **kw) -> LinearMoEForCausalLM:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=g)))
    cfg = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, intermediate_size=48, initializer_range=0.2,
                      tie_embeddings=False, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=24), **kw)
    return LinearMoEForCausalLM(cfg).eval()


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_cached_decode_through_growth_equals_the_full_forward(case):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = _model(g, **CASES[case])
    T, prompt = CACHE_ROUND + 10, 6          # the prefill cache holds 64 slots: one growth on the way
    ids = torch.randint(0, 61, (2, T), generator=g)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :prompt], return_states=True)
        logits, states = [out.logits], out.states
        for t in range(prompt, T):
            out = model(ids[:, t:t + 1], states=states, return_states=True)
            logits.append(out.logits)
            states = out.states
    assert _rel(torch.cat(logits, 1), full) < 1e-4


def _decode_rows(model, seqs, lengths, new, state):
    """``new`` one-token steps of a stacked batch: row b feeds its tokens ``lengths[b] ..`` -> logits [B, new, V]."""
    logits = []
    for t in range(new):
        out = model(torch.stack([s[n + t] for s, n in zip(seqs, lengths)])[:, None], states=state, return_states=True)
        logits.append(out.logits)
        state = out.states
    return torch.cat(logits, 1)


def test_ragged_stacked_decode_equals_each_row_full_forward():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = _model(g, **CASES["attention gqa"])
    lengths, new = [2, 9, 5], 7
    seqs = [torch.randint(0, 61, (n + new,), generator=g) for n in lengths]
    with torch.no_grad():
        states = stack_states([model(s[None, :n], return_states=True).states for s, n in zip(seqs, lengths)])
        logits = _decode_rows(model, seqs, lengths, new, reserve_caches(states, new))
        for b, (s, n) in enumerate(zip(seqs, lengths)):
            assert _rel(logits[b], model(s[None]).logits[0, n:]) < 1e-4


def test_stacking_with_room_and_consuming_the_rows_decodes_the_same():
    """stack_states(reserve=, consume=True), the decode benchmark's memory-lean path: the stacked caches
    already hold the room (no copy to grow them), the rows give up each layer once stacked, and decoding
    gives the same logits as stacking plainly then reserving."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = _model(g, **CASES["attention gqa"])
    lengths, new = [3, 60], 9  # 60 + 9 tokens pass the 64-slot rounding: the room must be made on purpose
    seqs = [torch.randint(0, 61, (n + new,), generator=g) for n in lengths]
    decode = lambda state: _decode_rows(model, seqs, lengths, new, state)  # noqa: E731
    with torch.no_grad():
        rows = [model(s[None, :n], return_states=True).states for s, n in zip(seqs, lengths)]
        plain = reserve_caches(stack_states(rows), new)
        rows = [model(s[None, :n], return_states=True).states for s, n in zip(seqs, lengths)]
        lean = stack_states(rows, reserve=new, consume=True)
        assert all(layer is None for row in rows for layer in row)
        assert all(c["k"].shape[2] >= c["used"] + new for c in lean)
        assert all(a["k"] is b["k"] for a, b in zip(lean, reserve_caches(lean, new)))  # no growth copy
        assert _rel(decode(lean), decode(plain)) < 1e-6
