"""Properties every part-2 token mixer must have: decoding token by token (and prefill then decode)
equals the full forward, packed documents equal separate runs, gradients reach every parameter,
and bad options raise a clear ValueError. The math itself is checked against float64 references in
the per-mixer test files (test_gsa.py, test_based.py, test_rwkv6.py, test_hgrn2.py, test_mom.py)."""
from __future__ import annotations

import pytest
import torch

from layer_testing import generator, jittered, rel_err
from linear_moe.layers import AttentionConfig, MixerConfig, build_mixer

NAMES = ["gsa", "based", "rebased", "rwkv6", "hgrn2", "mom_gla", "mom_gated_deltanet"]
# id -> (mixer, overrides): each mixer as its paper has it, plus the short convolutions GSA and HGRN2 leave
# off by default, and MoM without its own.
CASES = {**{name: (name, {}) for name in NAMES},
         "gsa-short_conv": ("gsa", dict(use_short_conv=True)), "hgrn2-short_conv": ("hgrn2", dict(use_short_conv=True)),
         "mom_gla-no_short_conv": ("mom_gla", dict(use_short_conv=False))}
HIDDEN = 16


# ReBased's normaliser Σ φ(q)·φ(k) = Σ (q̃·k̃)² can come close to 0 while its expanded features are
# O(1): the summation order of the chunked vs the step-by-step form then shows in fp32 (rel. err. up
# to ~1e-4 on rare draws). Its identities are checked in float64 instead (the ops run fp64 as fp64).
DTYPE = {"rebased": torch.float64}


def make(name: str, g: torch.Generator, **overrides) -> torch.nn.Module:
    """A tiny mixer whose parameters are all moved off their init (so zero-init terms such as RWKV's
    LoRAs or a bias cannot hide a bug)."""
    fields = dict(num_slots=4, head_dim=4, num_memories=3, topk_memories=2, shared_memory=True, chunk_size=4)
    fields.update(overrides)
    mixer = build_mixer(name, HIDDEN, MixerConfig(**fields), AttentionConfig(num_heads=2), layer_idx=1, num_layers=3)
    return jittered(mixer, g).to(DTYPE.get(name, torch.float32))


def run(mixer, x, state=None, cu_seqlens=None, mode=None):
    if mode is not None:
        mixer.mode = mode
    return mixer(x, state=state, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("case", list(CASES))
def test_decode_token_by_token_and_prefill_equal_full_forward(case):
    g = generator()
    name, overrides = CASES[case]
    mixer = make(name, g, **overrides).eval()
    x = torch.randn(2, 10, HIDDEN, generator=g, dtype=DTYPE.get(name, torch.float32))
    with torch.no_grad():
        full, full_state = run(mixer, x, mode="chunk")
        state, steps = None, []
        for t in range(x.shape[1]):
            y, state = run(mixer, x[:, t:t + 1], state, mode="recurrent")
            steps.append(y)
        # prefill, one decode step, then a multi-token continuation from the carried state
        prefill, state2 = run(mixer, x[:, :6], mode="chunk")
        step, state2 = run(mixer, x[:, 6:7], state2, mode="recurrent")
        tail, _ = run(mixer, x[:, 7:], state2, mode="chunk")
    assert rel_err(torch.cat(steps, 1), full) < 1e-4
    assert rel_err(torch.cat([prefill, step, tail], 1), full) < 1e-4
    assert set(state) == set(full_state)
    for key in full_state:
        assert rel_err(state[key], full_state[key]) < 1e-4, key


@pytest.mark.parametrize("case", list(CASES))
def test_packed_documents_equal_separate_runs(case):
    g = generator()
    name, overrides = CASES[case]
    mixer = make(name, g, **overrides).eval()
    lengths = [5, 1, 7]  # a 1-token document is shorter than the short convolution
    docs = [torch.randn(1, n, HIDDEN, generator=g, dtype=DTYPE.get(name, torch.float32)) for n in lengths]
    cu = torch.tensor([0, 5, 6, 13])
    with torch.no_grad():
        packed, packed_state = run(mixer, torch.cat(docs, 1), cu_seqlens=cu, mode="chunk")
        separate = [run(mixer, d, mode="chunk") for d in docs]
    assert rel_err(packed, torch.cat([y for y, _ in separate], 1)) < 1e-4
    for key, value in packed_state.items():
        assert value.shape[0] == len(lengths), key
        for n, (_, s) in enumerate(separate):
            assert rel_err(value[n:n + 1], s[key]) < 1e-4, (key, n)


@pytest.mark.parametrize("case", list(CASES))
def test_backward_reaches_every_parameter(case):
    g = generator()
    name, overrides = CASES[case]
    mixer = make(name, g, **overrides).train()
    x = torch.randn(2, 10, HIDDEN, generator=g, dtype=DTYPE.get(name, torch.float32), requires_grad=True)
    y, _ = run(mixer, x, mode="chunk")
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    aux = getattr(mixer, "aux_loss", None)
    if name.startswith("mom"):
        assert aux is not None and aux.dim() == 0
        loss = loss + aux
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in mixer.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


# (bad options, a piece of the message that names the bad value)
BAD = {
    "gsa": [(dict(num_slots=0), "num_slots=0"), (dict(feature_map="taylor"), "feature_map='taylor'"),
            (dict(gate_logit_normalizer=0.0), "gate_logit_normalizer=0.0")],
    "based": [(dict(feature_map="elu"), "feature_map='elu'")],
    "rebased": [(dict(feature_map="taylor"), "feature_map='taylor'")],
    "rwkv6": [(dict(expand_v=0.3), "expand_v")],
    "hgrn2": [(dict(expand_v=0.3), "expand_v"), (dict(use_short_conv=True, conv_size=7), "conv_size=7")],
    "mom_gla": [(dict(topk_memories=4), "topk_memories=4"), (dict(num_memories=0), "num_memories=0"),
                (dict(memory_aux_loss_coef=-1.0), "memory_aux_loss_coef=-1.0"),
                (dict(gate_logit_normalizer=-1.0), "gate_logit_normalizer=-1.0")],
    "mom_gated_deltanet": [(dict(topk_memories=0), "topk_memories=0"), (dict(output_norm="layernorm"), "layernorm"),
                           (dict(gate_fn="tanhh"), "gate_fn='tanhh'")],
}
COMMON_BAD = [(dict(mode="fastest"), "mode='fastest'"), (dict(backend="cuda"), "backend='cuda'"),
              (dict(num_kv_heads=3), "num_kv_heads=3")]


@pytest.mark.parametrize("name", NAMES)
def test_bad_options_raise_clear_errors(name):
    g = generator()
    for bad, message in BAD[name] + COMMON_BAD:
        with pytest.raises(ValueError) as info:
            make(name, g, **bad)
        assert message in str(info.value) and name in str(info.value), (bad, str(info.value))
