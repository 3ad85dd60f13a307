"""The separable pieces (LASP-2): splitting a sequence into blocks and recombining them with
`*_chunk_state` and `*_state_output` reproduces the whole-sequence result."""
from __future__ import annotations

import pytest
import torch

from linear_moe.ops import delta_rule, delta_rule_chunk_state, delta_rule_state_output, gla, gla_chunk_state, gla_state_output
from ops_testing import delta_inputs, generator, gla_inputs, rel_err

TOL = 1e-4


def _split(args, cut):
    first = {n: (x[:, :cut] if isinstance(x, torch.Tensor) and x.dim() >= 3 else x) for n, x in args.items()}
    second = {n: (x[:, cut:] if isinstance(x, torch.Tensor) and x.dim() >= 3 else x) for n, x in args.items()}
    return first, second


@pytest.mark.parametrize("kind", ["none", "constant", "scalar", "vector", "vector_bonus"])
def test_gla_blocks_recombine(kind):
    g = generator()
    args = gla_inputs(kind, g, T=30)
    h0 = args.pop("initial_state")
    o_full, s_full = gla(**args, initial_state=h0, output_final_state=True)
    blocks = _split(args, 13)
    state, outputs = h0, []
    for blk in blocks:
        o_zero, _ = gla(**blk, mode="chunk", chunk_size=8)  # zero initial state
        contrib = gla_state_output(blk["q"], state, blk.get("log_decay"), exclusive="bonus" in blk)
        outputs.append(o_zero + contrib)
        block_state, total = gla_chunk_state(blk["k"], blk["v"], blk.get("log_decay"), chunk_size=8)
        state = total.exp().unsqueeze(-1) * state + block_state
    assert rel_err(torch.cat(outputs, 1), o_full) < TOL
    assert rel_err(state, s_full) < TOL


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_delta_rule_blocks_recombine(gated):
    g = generator()
    args = delta_inputs(gated, g, T=30)
    h0 = args.pop("initial_state")
    o_full, s_full = delta_rule(**args, initial_state=h0, output_final_state=True)
    state, outputs = h0, []
    for blk in _split(args, 17):
        o_zero, _ = delta_rule(**blk, mode="chunk", chunk_size=8)
        contrib = delta_rule_state_output(blk["q"], blk["k"], blk["beta"], state, blk.get("log_decay"), chunk_size=8)
        outputs.append(o_zero + contrib)
        block_state, transition = delta_rule_chunk_state(blk["k"], blk["v"], blk["beta"], blk.get("log_decay"),
                                                         chunk_size=8)
        state = transition @ state + block_state
    assert rel_err(torch.cat(outputs, 1), o_full) < TOL
    assert rel_err(state, s_full) < TOL
